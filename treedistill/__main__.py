import sys

from treedistill.cli import main

sys.exit(main())
