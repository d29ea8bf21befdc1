# The binaries, built straight from Cargo.lock (no generated Cargo.nix).
{ pkgs, src, version }:
let
  crate = pname: description: pkgs.rustPlatform.buildRustPackage {
    inherit pname version;
    src = pkgs.lib.cleanSourceWith {
      inherit src;
      filter = path: type:
        let rel = pkgs.lib.removePrefix (toString src + "/") (toString path); in
        rel == "Cargo.toml" || rel == "Cargo.lock" || rel == "rustfmt.toml"
        || pkgs.lib.hasPrefix "crates" rel || pkgs.lib.hasPrefix "crds" rel || pkgs.lib.hasPrefix "examples" rel;
    };
    cargoLock.lockFile = src + "/Cargo.lock";
    cargoBuildFlags = [ "-p" pname ];
    # The workspace's tests need a control plane, sshd and nix-daemon: they run in CI, not here.
    doCheck = false;
    meta = { inherit description; mainProgram = pname; license = pkgs.lib.licenses.asl20; };
  };
in
{
  nixpool-operator = crate "nixpool-operator" "Reconciles NixBuilderPools into pools of Nix remote builders";
  nixpool-agent = crate "nixpool-agent" "PID 1 of the nixpool builder image";
  nixpool-gateway = crate "nixpool-gateway" "The SSH front door of a nixpool builder pool";
  builderctl = crate "builderctl" "Puts a nixpool builder pool into a developer's Nix";
}
