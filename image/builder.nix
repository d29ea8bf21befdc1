# The x86_64-linux builder image: Nix, OpenSSH and the cache clients, with nixpool-agent as
# PID 1, and nixpool-gateway (the pool's gateway pods run the same image). The FHS bits every binary and shell expects are made at image build time too, so even
# `kubectl exec ... sh` works before the agent runs (the agent makes them again, idempotently).
{ pkgs, agent, gateway, tag }:
let
  glibc = pkgs.glibc;
in
pkgs.dockerTools.buildLayeredImage {
  name = "nixpool-builder";
  inherit tag;
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
