"""A real Kubernetes control plane for tests: build (build.sh), run (harness), a node that runs
pods as local processes (podrunner), pytest fixtures (fixtures), and ``python -m controlplane up``
to run it all by hand."""
