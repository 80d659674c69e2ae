import sys

from modelfold.cli import main

sys.exit(main())
