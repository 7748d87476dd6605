"""Give the top-level name `kernels` back to the installed Hugging Face package.

This folder installs as ``sasi_online.kernels``. When the checkout's top folder is on
sys.path (``python -m sasi_online.cli`` run from it, ``python -c``, a REPL), ``import
kernels`` would find this folder first and break transformers, which imports the Hugging
Face package of that name. ``hand_over`` loads the installed package instead and puts it in
``sys.modules``, which ``import`` returns once this module's body ends.
"""
import importlib.machinery
import importlib.util
import os
import sys

_TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hand_over() -> None:
    search = [p for p in sys.path if os.path.abspath(p or os.curdir) != _TOP]
    spec = importlib.machinery.PathFinder.find_spec("kernels", search)
    if spec is None or spec.loader is None:
        raise ImportError(
            f"`import kernels` found the checkout's folder {_TOP}/kernels (its top folder is on "
            f"sys.path), and no installed Hugging Face `kernels` package to hand the name to. The "
            f"project's kernels import as `sasi_online.kernels`; for the other, `pip install kernels`.")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
    sys.modules.pop(__name__, None)  # this helper, loaded as `kernels._handover`, is not the new package's
