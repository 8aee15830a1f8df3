import sys

from genunc.cli import main

sys.exit(main())
