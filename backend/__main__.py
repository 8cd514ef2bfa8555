import sys

from backend.worker import main

sys.exit(main())
