"""Optional features are extras (`pip install 'gmaivl-rt[onnx]'`, `[serve]`, `[eval]`): one check names what to
install when a path needs a package that is missing."""
import importlib.util


def require(*packages: str, extra: str = "onnx") -> None:
    """Fail early, naming what to install, when an optional package a path needs is missing."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed: pip install 'gmaivl-rt[{extra}]'")
