{
  description = "nixpool: Nix remote builders on Kubernetes";

  # Locked in flake.lock; `nix flake update` moves it.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      # The output's shape uses builtins only (not nixpkgs.lib), so that
      # crates/operator/tests/packaging.rs can evaluate which attributes the flake offers on
      # every system without nixpkgs.
      genAttrs = names: f: builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);
      optionalAttrs = cond: attrs: if cond then attrs else { };
      linux = [ "x86_64-linux" "aarch64-linux" ];
      darwin = [ "aarch64-darwin" "x86_64-darwin" ];
      systems = linux ++ darwin;
      isLinux = system: builtins.elem system linux;
      forAll = f: genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).workspace.package.version;
      # The tag the chart defaults to for both images: its appVersion.
      appVersion =
        let m = builtins.match ".*\nappVersion: *\"?([^\"\n]+)\"?\n.*" (builtins.readFile ./charts/nixpool/Chart.yaml);
        in if m == null then throw "charts/nixpool/Chart.yaml has no appVersion line" else builtins.head m;
      # The repositories the chart pulls from by default.
      repos = {
        builder = "ghcr.io/nixpool/nixpool-builder";
        operator = "ghcr.io/nixpool/nixpool-operator";
      };
      rev = self.shortRev or self.dirtyShortRev or "dirty";
      dirty = !(self ? rev);

      imageOnly = "x86_64-linux";
      notHere = system: name: throw ''
        ${name} is an x86_64-linux image and this is ${system}. Build it through an x86_64-linux
        remote builder (a nixpool pool, see docs/mac.md):
          nix build .#packages.x86_64-linux.${name} --max-jobs 0
      '';
      linuxOnly = system: name: throw ''
        ${name} runs only on Linux (it is the builder image's PID 1 or the pool's gateway) and
        this is ${system}. On a Mac, builderctl is the command you want; to build ${name} itself:
          nix build .#packages.x86_64-linux.${name} --max-jobs 0
      '';
    in
    {
      packages = forAll (system: pkgs:
        let
          bins = import ./nix/packages.nix { inherit pkgs version; src = self; };
        in
        {
          inherit (bins) nixpool-operator builderctl;
          default = bins.builderctl;
        } // optionalAttrs (isLinux system) {
          # Linux-only APIs (mount namespaces, overlayfs, prctl): no darwin build.
          inherit (bins) nixpool-agent nixpool-gateway;
        } // optionalAttrs (system == imageOnly) {
          # Named and tagged as the chart's defaults, so `docker load` or `kind load
          # image-archive` gives the image a default install pulls.
          builder-image = import ./image/builder.nix {
            inherit pkgs;
            agent = bins.nixpool-agent;
            gateway = bins.nixpool-gateway;
            name = repos.builder;
            tag = appVersion;
          };
          operator-image = import ./image/operator.nix {
            inherit pkgs;
            operator = bins.nixpool-operator;
            name = repos.operator;
            tag = appVersion;
          };
        });

      # `nix build .#builder-image` (or .#nixpool-agent on a Mac) lands here and says what to do
      # instead.
      legacyPackages = forAll (system: pkgs:
        optionalAttrs (system != imageOnly) {
          builder-image = notHere system "builder-image";
          operator-image = notHere system "operator-image";
        } // optionalAttrs (!isLinux system) {
          nixpool-agent = linuxOnly system "nixpool-agent";
          nixpool-gateway = linuxOnly system "nixpool-gateway";
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

      apps = forAll (system: pkgs: optionalAttrs (system == imageOnly) {
        release = {
          type = "app";
          program = "${import ./nix/release.nix {
            inherit pkgs rev dirty appVersion;
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
