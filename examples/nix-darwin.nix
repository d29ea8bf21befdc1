# A Mac on nix-darwin: nix-darwin owns /etc, so declare the pool here instead of writing
# /etc/nix/machines (activation would abort with "Unexpected files in /etc").
# `builderctl machines-file` prints a module like this one, filled in, when nix-darwin manages
# Nix; add the file to your configuration's `imports`. With `nix.enable = false` (Determinate
# Nix) nix-darwin ignores nix.buildMachines, and builderctl writes /etc/nix/machines instead.
{ ... }:
{
  nix.distributedBuilds = true;
  nix.settings.builders-use-substitutes = true;
  nix.buildMachines = [
    {
      # status.endpoint of the pool (kubectl get nbp builders -o jsonpath='{.status.endpoint}')
      hostName = "builders.example.com";
      sshUser = "builder";
      protocol = "ssh-ng";
      systems = [ "x86_64-linux" ];
      # builderctl keygen puts a root-readable, passphrase-less key here.
      sshKey = "/etc/nix/nixpool_ed25519";
      maxJobs = 8;
      speedFactor = 1;
      supportedFeatures = [ "benchmark" "big-parallel" ];
      mandatoryFeatures = [ ];
      # base64 of status.hostPublicKey: pins the pool's host key, no known_hosts needed.
      publicHostKey = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUhiT2tPT3pvV3k4ZkxqT21KbWJtVDdLOEdtZWlFNVhhSDdTaWs4eTdEbTA=";
    }
  ];
}
