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
    command = ''echo "hello from $(uname -sr) with $(grep -c ^processor /proc/cpuinfo) vCPU and $(($(sed -n 's/^MemTotal: *\([0-9]*\) kB$/\1/p' /proc/meminfo) / 1024)) MiB"; echo "root: $(. /etc/os-release && echo "$PRETTY_NAME"), image $(grep ' /run/spectrum-image/lower ' /proc/1/mounts | cut -d' ' -f1,3,4)"; echo "python3: sha256(spectrum) = $(python3 -c "import hashlib; print(hashlib.sha256(b'spectrum').hexdigest())")"; echo "files: $(ls /mnt/spectrum | tr '\n' ' ')"; echo "network: $(ls /sys/class/net | tr '\n' ' ')"; exec sleep 3600'';
    memory_mib = 256;
    vcpus = 1;
    # Made by scripts/mkimage.sh --packages python3-minimal (demo/run_demo.py
    # builds it); python3 exists only in the image, not in the embedded guest.
    root_image = "/var/cache/spectrumd/images/python3.erofs";
    share_root = true;
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
