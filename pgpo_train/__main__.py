"""`python -m pgpo_train` == `pgpo-train`."""

from pgpo_train.cli import main

raise SystemExit(main())
