import sys

from vitcraft.cli import main

sys.exit(main())
