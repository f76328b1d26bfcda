"""`python -m fastlm.cli ...` runs the `fastlm` command."""
import sys

from .main import main

sys.exit(main())
