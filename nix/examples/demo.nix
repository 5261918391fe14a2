# The demo's configuration: evaluates to demo/config.json.
#   nix-instantiate --eval --strict --json nix/examples/demo.nix > config.json
let
  spectrum = import ../.;
in
spectrum.config {
  defaults = {
    vmm = "qemu";
    accel = "tcg";
    stop_timeout = 30;
  };

  applications.shell = spectrum.application {
    command = ''echo "hello from $(uname -sr) with $(grep -c ^processor /proc/cpuinfo) vCPU and $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"; echo "files: $(ls /mnt/spectrum | tr '\n' ' ')"; echo "network: $(ls /sys/class/net | tr '\n' ' ')"; exec sleep 3600'';
    memory_mib = 256;
    vcpus = 1;
  };

  resources = {
    lan = spectrum.network { };
    docs = spectrum.directory {
      path = "/usr/share/doc";
      writable = false;
    };
  };

  instances = {
    work-shell = spectrum.instance {
      application = "shell";
      resources = [ "lan" "docs" ];
    };
    home-shell = spectrum.instance {
      application = "shell";
      resources = [ ];
    };
  };
}
