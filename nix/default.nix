# spectrum: build spectrumd's configuration in plain Nix (builtins only).
#
#   let spectrum = import ./nix; in
#   spectrum.config {
#     defaults = { vmm = "qemu"; accel = "kvm"; };
#     applications.shell = spectrum.application { command = "exec sh"; };
#     resources.lan = spectrum.network { };
#     resources.docs = spectrum.directory { path = "/srv/docs"; };
#     instances.work-shell = spectrum.instance {
#       application = "shell";
#       resources = [ "lan" "docs" ];
#     };
#   }
#
# `config` checks everything the daemon checks and evaluates to the JSON it
# reads; a mistake fails evaluation with the daemon's own message, e.g.
# `instances.work-shell.application: no application "shel"`. The other
# functions only give each part its shape: the checks need the part's name,
# which only `config` knows.
let
  check = import ./check.nix;

  attrsOf = what: args:
    if builtins.isAttrs args then
      args
    else
      throw "spectrum.${what}: expected an attribute set, got a ${builtins.typeOf args}";

  resource = type: args: attrsOf type args // { inherit type; };
in
{
  # { command, memory_mib?, vcpus?, kernel?, initrd?, params?, arch?,
  #   root_image?, share_root?, disks? ([ { path, writable?, overlay? } ]) }
  application = attrsOf "application";

  # { host_address? }
  network = resource "network";
  # { path, writable? }
  directory = resource "directory";
  # { vendor, product, serial? }: ids as 4 lower-case hex digits
  usb = resource "usb";
  # { path }: the compositor's socket
  wayland = resource "wayland";

  # { application, resources? ([ names ]), vmm?, accel?, stop_timeout?, restart? }
  instance = attrsOf "instance";

  # The whole configuration { version?, defaults?, applications?, resources?,
  # instances? } -> the JSON value spectrumd reads.
  inherit (check) config;

  # The instances of the daemon's data file (STATE_DIR/instances.json), to
  # adopt run-time instances into the configuration. A missing file has none.
  # Errors in them are named as the daemon names them: data.instances.NAME...
  importDataFile =
    path:
    if builtins.pathExists path then
      check.dataInstances (builtins.fromJSON (builtins.readFile path))
    else
      { };

  # configured // imported, refusing a name defined in both (as the daemon does).
  inherit (check) mergeInstances;
}
