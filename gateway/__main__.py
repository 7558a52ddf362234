from gateway.tools.cli import main

raise SystemExit(main())
