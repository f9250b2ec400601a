from hostclient.cli import main

raise SystemExit(main())
