"""Errors a user can fix. Each message names the input and says what to do."""


class UserInputError(ValueError):
    """Bad input from the user: a path, a file, a value. The message says how to fix it."""


class ModelFolderError(UserInputError):
    """A model folder that is missing, incomplete or does not match its partner."""


class CorruptImageError(UserInputError):
    """An image file that cannot be decoded."""
