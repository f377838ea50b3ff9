from dmmig.entry.cli import main

raise SystemExit(main())
