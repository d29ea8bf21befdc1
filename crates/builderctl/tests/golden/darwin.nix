# nixpool builders for nix-darwin, written by builderctl. Save it as nixpool.nix next to your
# configuration, add ./nixpool.nix to its `imports`, then run `darwin-rebuild switch`.
{ ... }:
{
  nix.distributedBuilds = true;
  nix.settings.builders-use-substitutes = true;
  nix.buildMachines = [
    {
      # nixpool pool builds/kvm
      hostName = "192.0.2.10:2222";
      sshUser = "nix";
      protocol = "ssh-ng";
      sshKey = "/etc/nix/nixpool_ed25519";
      systems = [ "x86_64-linux" ];
      maxJobs = 8;
      speedFactor = 1;
      supportedFeatures = [ "kvm" "nixos-test" ];
      mandatoryFeatures = [ "kvm" ];
      publicHostKey = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUdxbHhIU0NzZlcwQnQyYkR0SVZiNEhFVlBoTWszbWtNUnRCZjNtNm41aEw="; # ssh-ed25519
    }
    {
      # nixpool pool builds/linux
      hostName = "nbp.example.com";
      sshUser = "builder";
      protocol = "ssh-ng";
      sshKey = "/etc/nix/nixpool_ed25519";
      systems = [ "x86_64-linux" "i686-linux" ];
      maxJobs = 8;
      speedFactor = 2;
      supportedFeatures = [ "benchmark" "big-parallel" ];
      mandatoryFeatures = [ ];
      publicHostKey = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUhiT2tPT3pvV3k4ZkxqT21KbWJtVDdLOEdtZWlFNVhhSDdTaWs4eTdEbTA="; # ssh-ed25519
    }
  ];
}
