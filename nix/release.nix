# `nix run .#release`: push the builder and operator images as the tags the chart defaults to
# (its appVersion) and as amd64-<git sha>:
#   nix run .#release                                   # to ghcr.io/nixpool, the chart's default
#   NIXPOOL_REGISTRY=ghcr.io/your-org nix run .#release # a fork's own registry
# It refuses a tree with uncommitted changes, and an appVersion tag that already exists (bump
# appVersion in charts/nixpool/Chart.yaml, or NIXPOOL_RELEASE_REPLACE=1). The registry token
# comes from GHCR_TOKEN, else `gh auth token`; the user from GHCR_USER, else the token's GitHub
# login. skopeo runs with ./skopeo-policy.json: it copies only from the local image archives.
{ pkgs, rev, dirty, appVersion, builderImage, operatorImage }:
pkgs.writeShellApplication {
  name = "nixpool-release";
  runtimeInputs = [ pkgs.skopeo pkgs.gh pkgs.jq pkgs.gnugrep pkgs.gzip pkgs.coreutils ];
  # From a dirty tree the app only refuses (and builds no image): a release is a commit.
  text = if dirty then ''
    echo "release: the tree has uncommitted changes (the flake was evaluated at ${rev}): commit first, then run nix run .#release again" >&2
    exit 1
  '' else ''
    registry="''${NIXPOOL_REGISTRY:-ghcr.io/nixpool}"
    registry="''${registry%/}"
    version="${appVersion}"
    sha_tag="amd64-${rev}"
    policy="${./skopeo-policy.json}"

    token="''${GHCR_TOKEN:-}"
    if [ -z "$token" ] && command -v gh >/dev/null; then
      token=$(gh auth token 2>/dev/null) || token=""
    fi
    if [ -z "$token" ]; then
      echo "release: no registry token: export GHCR_TOKEN=<token with write:packages>, or log in with 'gh auth login' (the release asks 'gh auth token')" >&2
      exit 1
    fi
    user="''${GHCR_USER:-}"
    if [ -z "$user" ] && command -v gh >/dev/null; then
      user=$(GH_TOKEN="$token" gh api user --jq .login 2>/dev/null) || user=""
    fi
    if [ -z "$user" ]; then
      echo "release: no registry user: export GHCR_USER=<your user name at ''${registry%%/*}>" >&2
      exit 1
    fi

    # The token goes through stdin, never on a command line.
    printf '%s' "$token" | skopeo login --username "$user" --password-stdin "''${registry%%/*}"

    # A released appVersion is what installs pull by default: never replace it by accident.
    for name in nixpool-builder nixpool-operator; do
      tags=$(skopeo list-tags "docker://$registry/$name" 2>/dev/null | jq -r '.Tags[]') || tags=""
      if printf '%s\n' "$tags" | grep -qxF "$version" && [ "''${NIXPOOL_RELEASE_REPLACE:-}" != 1 ]; then
        echo "release: $registry/$name:$version already exists: bump appVersion in charts/nixpool/Chart.yaml for a new release, or set NIXPOOL_RELEASE_REPLACE=1 to replace it" >&2
        exit 1
      fi
    done

    # The images are gzipped docker archives; skopeo is given them unpacked (some skopeo
    # versions misread a compressed docker-archive: "loading tar component manifest.json").
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    for pair in "nixpool-builder=${builderImage}" "nixpool-operator=${operatorImage}"; do
      name="''${pair%%=*}"
      gzip -dcf "''${pair#*=}" > "$work/$name.tar"
      # The sha tag first: if a push fails, the tag installs pull by default is unchanged.
      for tag in "$sha_tag" "$version"; do
        echo "release: pushing $registry/$name:$tag" >&2
        skopeo --policy "$policy" copy "docker-archive:$work/$name.tar" "docker://$registry/$name:$tag"
      done
      rm "$work/$name.tar"
    done
    echo "release: pushed $registry/nixpool-builder and $registry/nixpool-operator as $version and $sha_tag" >&2
  '';
}
