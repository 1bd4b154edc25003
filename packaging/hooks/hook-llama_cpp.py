"""llama-cpp-python loads libllama/libggml with ctypes from its own `lib/` folder, which
PyInstaller's analysis cannot see ("Shared library with base name 'llama' not found"):
collect those libraries explicitly, at the path llama_cpp looks in."""

from PyInstaller.utils.hooks import collect_dynamic_libs, get_package_paths

binaries = collect_dynamic_libs("llama_cpp")
_, pkg_dir = get_package_paths("llama_cpp")
for sub in ("lib",):
    from pathlib import Path

    folder = Path(pkg_dir) / sub
    if folder.is_dir():
        binaries += [(str(p), f"llama_cpp/{sub}") for p in folder.iterdir() if ".so" in p.name]
