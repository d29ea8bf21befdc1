{
  description = "nixpool: Nix remote builders on Kubernetes";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "aarch64-darwin" "x86_64-darwin" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
      rev = self.shortRev or self.dirtyShortRev or "dirty";
      imageOnly = "x86_64-linux";
      notHere = system: name: throw ''
        ${name} is an x86_64-linux image and this is ${system}. Build it through an x86_64-linux
        remote builder (a nixpool pool, see docs/mac.md):
          nix build .#packages.x86_64-linux.${name} --max-jobs 0
      '';
    in
    {
      packages = forAll (system: pkgs:
        let
          bins = import ./nix/packages.nix { inherit pkgs; src = self; version = "0.1.0"; };
        in
        {
          inherit (bins) nixpool-operator nixpool-agent nixpool-gateway builderctl;
          default = bins.builderctl;
        } // nixpkgs.lib.optionalAttrs (system == imageOnly) {
          builder-image = import ./image/builder.nix { inherit pkgs; agent = bins.nixpool-agent; gateway = bins.nixpool-gateway; tag = "amd64-${rev}"; };
          operator-image = import ./image/operator.nix { inherit pkgs; operator = bins.nixpool-operator; tag = "amd64-${rev}"; };
        });

      # `nix build .#builder-image` on a Mac lands here and says what to do instead.
      legacyPackages = forAll (system: pkgs: nixpkgs.lib.optionalAttrs (system != imageOnly) {
        builder-image = notHere system "builder-image";
        operator-image = notHere system "operator-image";
      });

      checks = forAll (system: pkgs: {
        # The CRD the built operator prints is the one in crds/.
        crd = pkgs.runCommand "nixpool-crd-in-sync" { } ''
          ${self.packages.${system}.nixpool-operator}/bin/nixpool-operator crd > generated.yaml
          if ! diff -u ${./crds/nixbuilderpools.nixpool.dev.yaml} generated.yaml; then
            echo "crds/ is out of date: nixpool-operator crd > crds/nixbuilderpools.nixpool.dev.yaml" >&2
            exit 1
          fi
          touch $out
        '';
      });

      apps = forAll (system: pkgs: nixpkgs.lib.optionalAttrs (system == imageOnly) {
        release = {
          type = "app";
          program = "${import ./nix/release.nix {
            inherit pkgs rev;
            builderImage = self.packages.${system}.builder-image;
            operatorImage = self.packages.${system}.operator-image;
          }}/bin/nixpool-release";
        };
      });

      devShells = forAll (system: pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [ cargo rustc clippy rustfmt rust-analyzer kubectl kubernetes-helm skopeo etcd openssl nix ];
        };
      });
    };
}
