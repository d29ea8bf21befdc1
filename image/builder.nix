# The x86_64-linux builder image: Nix, OpenSSH and the cache clients, with nixpool-agent as
# PID 1, and nixpool-gateway (the pool's gateway pods run the same image). The FHS bits every
# binary and shell expects are made at image build time too, so even `kubectl exec ... sh` works
# before the agent runs (the agent makes them again, idempotently).
#
# The image carries a Nix store database (includeNixDB): every path of the closure of `contents`
# is registered as valid in /nix/var/nix/db, and each of `contents` is a GC root
# (/nix/var/nix/gcroots/docker). Without it every path in the image is invalid to the builder's
# nix-daemon: the first automatic GC (min-free) deletes glibc, nix, openssh and the agent, and a
# client uploading a path the image already has makes the daemon delete the live copy first.
# The agent mounts the image's /nix (database included) as the read-only lower layer of the
# overlay at /nix (docs/agent.md), so this database is the one the daemon opens; its writes land
# in the overlay's upper layer on the store volume.
# Only the closure of `contents` is registered: a store path used elsewhere (config, commands)
# must be in that closure (glibc is: nix and openssh link it).
{ pkgs, agent, gateway, name ? "nixpool-builder", tag }:
let
  glibc = pkgs.glibc;
in
pkgs.dockerTools.buildLayeredImage {
  inherit name tag;
  includeNixDB = true;
  contents = with pkgs; [
    agent
    gateway
    nix
    openssh
    bashInteractive
    coreutils
    gnutar
    gzip
    xz
    git
    cacert
    attic-client
    cachix
    dockerTools.binSh # /bin/sh
    dockerTools.usrBinEnv # /usr/bin/env
  ];
  # Without /lib64/ld-linux-x86-64.so.2 every non-Nix binary dies with "Bus error".
  fakeRootCommands = ''
    mkdir -p lib64 tmp var/empty run/sshd etc
    ln -sf ${glibc}/lib/ld-linux-x86-64.so.2 lib64/ld-linux-x86-64.so.2
    chmod 1777 tmp
    chmod 0755 var/empty run/sshd
  '';
  enableFakechroot = false;
  config = {
    Entrypoint = [ "/bin/nixpool-agent" "run" ];
    Env = [
      "PATH=/bin:/usr/bin"
      "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
      "NIX_SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
    ];
    ExposedPorts = { "22/tcp" = { }; "8090/tcp" = { }; };
    Labels = { "org.opencontainers.image.source" = "https://github.com/nixpool/nixpool"; };
  };
}
