from dmmig.cli import main

raise SystemExit(main())
