// The sandbox image's only program; no dependencies.
module analysisq.io/controlplane/pause

go 1.24.0
