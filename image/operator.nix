# The operator image: just the static-ish operator and CA certificates, run as a non-root user.
{ pkgs, operator, name ? "nixpool-operator", tag }:
pkgs.dockerTools.buildLayeredImage {
  inherit name tag;
  contents = [ operator pkgs.cacert ];
  config = {
    Entrypoint = [ "/bin/nixpool-operator" ];
    Cmd = [ "run" ];
    User = "65532:65532";
    Env = [ "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt" ];
    ExposedPorts = { "8080/tcp" = { }; };
  };
}
