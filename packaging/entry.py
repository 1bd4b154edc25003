"""Entry point of the frozen binary: the same CLI as `python -m appliance`."""

from appliance.cli import main

raise SystemExit(main())
