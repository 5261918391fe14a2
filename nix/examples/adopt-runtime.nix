# Adopting run-time instances: those made with CreateInstance / spectrumctl
# create live in the daemon's data file, STATE_DIR/instances.json (a copy of
# one is beside this file). Importing it makes them part of the configuration,
# checked like any other instance. Once the new configuration is in place,
# remove them from the data file (spectrumctl delete NAME before switching),
# or the daemon refuses a name defined in both.
#   nix-instantiate --eval --strict --json nix/examples/adopt-runtime.nix
let
  spectrum = import ../.;
in
spectrum.config {
  defaults.accel = "tcg";
  applications.shell = spectrum.application { command = "exec sh"; };
  resources = {
    lan = spectrum.network { };
    docs = spectrum.directory { path = "/usr/share/doc"; };
  };
  # mergeInstances refuses a name in both; `//` would let the data file win.
  instances = spectrum.mergeInstances {
    work-shell = spectrum.instance {
      application = "shell";
      resources = [ "lan" ];
    };
  } (spectrum.importDataFile ./instances.json);
}
