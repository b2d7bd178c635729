#!/usr/bin/env bash
# Builds the tools the end-to-end tests need -- etcd, kube-apiserver, kubectl and helm -- and, for
# the single-node cluster (tools/cluster, make e2e-cluster), kubelet, kube-controller-manager,
# kube-scheduler, kube-proxy and a trimmed CoreDNS, from published Go modules, into a versioned cache
# outside the repository.
# Each binary is rebuilt only when its pinned version changes (the version is part of its path).
#
# Usage: tools/build-toolchain.sh [etcd|kube|helm|node|coredns|all|cluster]   (prints the bin directory last)
#   all      etcd, kube-apiserver, kubectl, helm (what `make test` needs)
#   cluster  all + node (kubelet, kube-controller-manager, kube-scheduler, kube-proxy) + coredns
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.14.7}"

CACHE_ROOT="${PROMOTION_GATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/promotion-gate}"
BIN_DIR="$CACHE_ROOT/bin"
export GOMODCACHE="$CACHE_ROOT/go/mod"
export GOCACHE="$CACHE_ROOT/go/build"
export GOFLAGS="-mod=mod"
export CGO_ENABLED=0
export GOTOOLCHAIN=local
mkdir -p "$BIN_DIR" "$GOMODCACHE" "$GOCACHE"

log() { printf '[toolchain] %s\n' "$*" >&2; }

# Cold build times are kept next to the binaries; the end-to-end tests print them in their summary.
timed() {
  local name="$1"; shift
  local start; start=$(date +%s)
  local before; before=$(ls "$BIN_DIR" | wc -l)
  "$@"
  local seconds=$(( $(date +%s) - start ))
  if [[ $(ls "$BIN_DIR" | wc -l) -ne $before ]]; then
    echo "$name built in ${seconds}s on $(date -u +%Y-%m-%dT%H:%M:%SZ) (K8S $K8S_VERSION, etcd $ETCD_VERSION, helm $HELM_VERSION, coredns $COREDNS_VERSION)" \
      >> "$BIN_DIR/build-times.log"
  fi
  log "$name ready in ${seconds}s"
}

build_etcd() {
  local out="$BIN_DIR/etcd-$ETCD_VERSION"
  [[ -x "$out" ]] && { log "etcd $ETCD_VERSION cached"; return; }
  local mod="$CACHE_ROOT/src/etcd-$ETCD_VERSION"
  rm -rf "$mod"; mkdir -p "$mod"
  (
    cd "$mod"
    go mod init promotion-gate.local/etcd-build >/dev/null 2>&1
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    go build -trimpath -ldflags "-s -w" -o "$out.tmp" go.etcd.io/etcd/server/v3
  )
  mv "$out.tmp" "$out"
}

NODE_COMMANDS="kubelet kube-controller-manager kube-scheduler kube-proxy"

# The wrapper module that requires k8s.io/kubernetes: shared by kube-apiserver/kubectl and the node
# binaries. Its tools.go imports every command so that `go mod tidy` records all their dependencies.
kube_module() {
  local mod="$CACHE_ROOT/src/kubernetes-$K8S_VERSION" staging="v0.${K8S_VERSION#v1.}"
  if [[ -f "$mod/go.mod" && -f "$mod/tools.go" ]] && grep -q 'cmd/kube-proxy' "$mod/tools.go"; then
    return
  fi
  if [[ ! -f "$mod/go.mod" ]]; then
    rm -rf "$mod"; mkdir -p "$mod"
    (
      cd "$mod"
      go mod init promotion-gate.local/kube-build >/dev/null 2>&1
      # k8s.io/kubernetes lists its staging modules at v0.0.0 with local replaces that a consumer
      # ignores; map each one to its published v0.Y.Z. The list comes from the real go.mod.
      local gomod
      gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
      local replaces
      replaces=$(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$gomod" | sort -u)
      for m in $replaces; do
        go mod edit -replace "$m=$m@$staging"
      done
      go mod edit -require "k8s.io/kubernetes@$K8S_VERSION"
    )
  fi
  cat > "$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  (cd "$mod" && { go mod tidy -e >/dev/null 2>&1 || true; })
}

kube_ldflags() {  # server|client
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  [[ "$1" == client ]] && ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  printf '%s' "$ld"
}

kube_build() {  # command, ldflags kind
  local out="$BIN_DIR/$1-$K8S_VERSION"
  (cd "$CACHE_ROOT/src/kubernetes-$K8S_VERSION" &&
    go build -trimpath -tags=notest,grpcnotrace -ldflags "$(kube_ldflags "$2")" -o "$out.tmp" "k8s.io/kubernetes/cmd/$1")
  mv "$out.tmp" "$out"
}

build_kube() {
  local apiserver="$BIN_DIR/kube-apiserver-$K8S_VERSION" kubectl="$BIN_DIR/kubectl-$K8S_VERSION"
  if [[ -x "$apiserver" && -x "$kubectl" ]]; then log "kube-apiserver/kubectl $K8S_VERSION cached"; return; fi
  kube_module
  [[ -x "$apiserver" ]] || kube_build kube-apiserver server
  [[ -x "$kubectl" ]] || kube_build kubectl client
}

# One command at a time, so each gets its own line in build-times.log.
build_node_command() {
  local out="$BIN_DIR/$1-$K8S_VERSION"
  [[ -x "$out" ]] && { log "$1 $K8S_VERSION cached"; return; }
  kube_module
  kube_build "$1" server
}

# Cluster DNS for the single-node cluster: CoreDNS's own main, trimmed to the plugins its Corefile
# uses (bind, errors, kubernetes, template). The full `go install github.com/coredns/coredns` also
# compiles every cloud DNS SDK (Route 53, Azure, Google Cloud DNS, ...): about 3.5 minutes more.
build_coredns() {
  local out="$BIN_DIR/coredns-$COREDNS_VERSION"
  [[ -x "$out" ]] && { log "coredns $COREDNS_VERSION cached"; return; }
  local mod="$CACHE_ROOT/src/coredns-$COREDNS_VERSION"
  rm -rf "$mod"; mkdir -p "$mod"
  (
    cd "$mod"
    go mod init promotion-gate.local/coredns-build >/dev/null 2>&1
    go mod edit -require "github.com/coredns/coredns@$COREDNS_VERSION"
    cat > main.go <<'GO'
// CoreDNS with only the plugins the single-node cluster's Corefile uses.
package main

import (
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/template"

	"github.com/coredns/coredns/coremain"
)

func main() {
	coremain.Run()
}
GO
    go mod tidy >/dev/null 2>&1 || go mod tidy
    go build -trimpath -ldflags "-s -w" -o "$out.tmp" .
  )
  mv "$out.tmp" "$out"
}

build_helm() {
  local out="$BIN_DIR/helm-$HELM_VERSION"
  [[ -x "$out" ]] && { log "helm $HELM_VERSION cached"; return; }
  local mod="$CACHE_ROOT/src/helm-$HELM_VERSION"
  rm -rf "$mod"; mkdir -p "$mod"
  (
    cd "$mod"
    GOBIN="$mod/bin" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    mv "$mod/bin/helm" "$out"
  )
}

link() { ln -sf "$1-$2" "$BIN_DIR/$1"; }

base() {
  timed helm build_helm; link helm "$HELM_VERSION"
  timed etcd build_etcd; link etcd "$ETCD_VERSION"
  timed kube-apiserver+kubectl build_kube; link kube-apiserver "$K8S_VERSION"; link kubectl "$K8S_VERSION"
}

node_set() {
  local c
  for c in $NODE_COMMANDS; do timed "$c" build_node_command "$c"; link "$c" "$K8S_VERSION"; done
}

dns_set() { timed coredns build_coredns; link coredns "$COREDNS_VERSION"; }

what="${1:-all}"
case "$what" in
  etcd) timed etcd build_etcd; link etcd "$ETCD_VERSION" ;;
  kube) timed kube-apiserver+kubectl build_kube; link kube-apiserver "$K8S_VERSION"; link kubectl "$K8S_VERSION" ;;
  helm) timed helm build_helm; link helm "$HELM_VERSION" ;;
  node) node_set ;;
  coredns) dns_set ;;
  all) base ;;
  cluster) base; node_set; dns_set ;;
  *) echo "usage: $0 [etcd|kube|helm|node|coredns|all|cluster]" >&2; exit 2 ;;
esac
echo "$BIN_DIR"
