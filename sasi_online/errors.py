"""Errors a user can fix. Each message names the input and says what to do."""


class UserInputError(ValueError):
    """Bad input from the user: a path, a file, a value. The message says how to fix it."""


class ModelFolderError(UserInputError):
    """A model folder that is missing, incomplete or does not match its partner."""


class CorruptImageError(UserInputError):
    """An image file that cannot be decoded."""


class OnlineGenerationError(RuntimeError):
    """An online run that asked for SASI and got none: every producer stopped with an error,
    or none reached a trainer in time. The run stopped at a checkpoint (nothing lost); the
    message names the producers' errors and how to resume."""
