"""`python -m reparam`: the ops demo (see `reparam.demo`)."""

from reparam.demo import main

main()
