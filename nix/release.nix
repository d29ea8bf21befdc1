# `nix run .#release`: build both images, tag them amd64-<git sha> and latest, push them.
#   NIXPOOL_REGISTRY=ghcr.io/your-org nix run .#release
# The registry token comes from GHCR_TOKEN, else ~/.config/gh/token.
{ pkgs, rev, builderImage, operatorImage }:
pkgs.writeShellApplication {
  name = "nixpool-release";
  runtimeInputs = [ pkgs.skopeo pkgs.coreutils ];
  text = ''
    registry="''${NIXPOOL_REGISTRY:-}"
    if [ -z "$registry" ]; then
      echo "release: set NIXPOOL_REGISTRY to the registry and owner to push to, e.g. NIXPOOL_REGISTRY=ghcr.io/your-org" >&2
      exit 1
    fi
    token="''${GHCR_TOKEN:-}"
    if [ -z "$token" ] && [ -r "$HOME/.config/gh/token" ]; then
      token=$(cat "$HOME/.config/gh/token")
    fi
    if [ -z "$token" ]; then
      echo "release: no registry token: export GHCR_TOKEN=<token with write:packages>, or log in with 'gh auth login' so that ~/.config/gh/token exists" >&2
      exit 1
    fi
    user="''${GHCR_USER:-nixpool}"
    # The token goes through stdin, never on a command line.
    printf '%s' "$token" | skopeo login --username "$user" --password-stdin "''${registry%%/*}"
    for pair in "nixpool-builder=${builderImage}" "nixpool-operator=${operatorImage}"; do
      name="''${pair%%=*}"; archive="''${pair#*=}"
      for tag in "amd64-${rev}" latest; do
        echo "release: pushing $registry/$name:$tag" >&2
        skopeo copy "docker-archive:$archive" "docker://$registry/$name:$tag"
      done
    done
  '';
}
