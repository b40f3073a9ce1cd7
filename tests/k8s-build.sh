# shellcheck shell=bash
# Sourced by tests/build-control-plane and tests/build-node: builds commands of the pinned
# k8s.io/kubernetes (tests/versions.env) from the Go module proxy with the machine's Go.
# The caller sets `log` (progress with elapsed seconds on stderr) and sources versions.env.

export GOTOOLCHAIN=local GOFLAGS=-mod=mod

# k8s_module DIR CMD...: prepares in DIR a wrapper module that builds k8s.io/kubernetes/cmd/CMD
# for each CMD. k8s.io/kubernetes cannot be built as a dependency as is: its go.mod replaces
# every k8s.io/X staging module with ./staging/src/k8s.io/X, so the wrapper replaces each
# with its published k8s.io/X@$KUBERNETES_STAGING_VERSION instead.
k8s_module() {
  local dir=$1 cmd gomod
  shift
  mkdir -p "$dir"
  (
    cd "$dir"
    [ -f go.mod ] || go mod init portsentry-k8s/k8s-build >/dev/null 2>&1
    log "resolving k8s.io/kubernetes@$KUBERNETES_VERSION and its staging modules"
    gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    [ -f "$gomod" ] || { echo "$(basename "$0"): could not download k8s.io/kubernetes@$KUBERNETES_VERSION" >&2; exit 1; }
    grep -oE 'k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$gomod" | awk '{print $1}' | sort -u |
      while read -r m; do go mod edit -replace="$m=$m@$KUBERNETES_STAGING_VERSION"; done
    go mod edit -require="k8s.io/kubernetes@$KUBERNETES_VERSION"
    {
      printf '//go:build tools\n\npackage tools\n\nimport (\n'
      for cmd in "$@"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$cmd"; done
      printf ')\n'
    } > tools.go
    log "downloading modules"
    go mod tidy >/dev/null 2>&1 || go get "k8s.io/kubernetes@$KUBERNETES_VERSION"
  )
}

# k8s_build DIR BIN CMD: builds k8s.io/kubernetes/cmd/CMD from the wrapper module in DIR into
# BIN/CMD with the version stamped as a release build stamps it; nothing if it is there.
k8s_build() {
  local dir=$1 bin=$2 cmd=$3 minor b_start
  [ -x "$bin/$cmd" ] && return 0
  minor=${KUBERNETES_VERSION#v1.}
  minor=${minor%%.*}
  log "building $cmd (several minutes on 2 cores)"
  b_start=$(date +%s)
  (
    cd "$dir"
    go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
      -o "$bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
  )
  mv "$bin/$cmd.tmp" "$bin/$cmd"
  log "built $cmd in $(( $(date +%s) - b_start ))s"
}
