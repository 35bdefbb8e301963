import sys

from gmaivl_rt.gpu_check.run import main

sys.exit(main())
