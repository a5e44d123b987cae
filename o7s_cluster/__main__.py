from o7s_cluster.cli.main import main

raise SystemExit(main())
