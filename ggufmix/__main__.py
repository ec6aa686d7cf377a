from __future__ import annotations

from ggufmix.cli import main

if __name__ == "__main__":
    main()
