from o7s_cluster.cli import main

raise SystemExit(main())
