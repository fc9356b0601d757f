"""Moved into the package: use ``commtrain ray ...`` (this shim keeps old command lines working)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's commtrain first
from commtrain.launch_ray import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
