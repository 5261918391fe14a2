# A desktop: two browsers of one application holding different resources,
# every resource type, and an application with its own kernel.
#   nix-instantiate --eval --strict --json nix/examples/desktop.nix > config.json
let
  spectrum = import ../.;
in
spectrum.config {
  version = 1;
  defaults = {
    vmm = "crosvm";
    accel = "kvm";
  };

  applications = {
    browser = spectrum.application {
      command = "exec firefox";
      memory_mib = 2048;
      vcpus = 2;
    };
    # Paths are strings: a Nix path value (/srv/x, ./x) would be used as is,
    # never copied into the store; write "${./x}" to copy it.
    editor = spectrum.application {
      command = "exec emacs";
      kernel = "/var/lib/spectrum/kernels/vmlinuz";
      initrd = "/var/lib/spectrum/kernels/initrd.img";
      params = "quiet";
      root_image = "/var/lib/spectrum/images/editor.img";
      share_root = true;
      disks = [ { path = "/var/lib/spectrum/disks/editor-home.img"; writable = true; } ];
    };
    # The embedded guest, booted into a root image (scripts/mkimage.sh, or a
    # Nix derivation that follows the README's image contract); its writable
    # layer is kept on a disk of its own.
    notebook = spectrum.application {
      command = "exec python3 -m http.server";
      root_image = "/var/cache/spectrumd/images/python3.erofs";
      share_root = true;
      disks = [
        { path = "/var/lib/spectrum/disks/notebook-rw.img"; writable = true; overlay = true; }
      ];
    };
  };

  resources = {
    work-net = spectrum.network { host_address = "10.10.0.1/24"; };
    bank-net = spectrum.network { };
    work-docs = spectrum.directory {
      path = "/home/user/work";
      writable = true;
    };
    security-key = spectrum.usb {
      vendor = "1050";
      product = "0407";
    };
    display = spectrum.wayland { path = "/run/user/1000/wayland-0"; };
  };

  instances = {
    work-browser = spectrum.instance {
      application = "browser";
      resources = [ "work-net" "work-docs" "display" ];
    };
    bank-browser = spectrum.instance {
      application = "browser";
      resources = [ "bank-net" "security-key" "display" ];
      stop_timeout = 10;
    };
    # QEMU has no virtio-wl, so an instance on QEMU cannot hold a Wayland socket.
    work-editor = spectrum.instance {
      application = "editor";
      resources = [ "work-docs" ];
      vmm = "qemu";
    };
  };
}
