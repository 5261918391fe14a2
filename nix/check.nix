# The validator: the same rules, in the same order and with the same messages,
# as spectrumd/model/config.py, which stays the source of truth. Each check
# throws "KEY.PATH: problem"; `config` returns the JSON value the daemon reads.
let
  inherit (builtins)
    any
    attrNames
    concatLists
    concatStringsSep
    deepSeq
    elem
    filter
    foldl'
    genList
    head
    isString
    length
    listToAttrs
    mapAttrs
    match
    seq
    split
    stringLength
    substring
    toJSON
    typeOf
    unsafeDiscardStringContext
    ;

  # importDataFile marks each instance with the key path the daemon would name
  # for it ("data.instances.NAME"); the mark never reaches the output.
  origin = "__spectrumKeyPath";

  nameRule = "[a-z0-9][a-z0-9-]{0,62}";
  maxCommand = 64 * 1024;
  maxDisks = 16;
  resourceTypes = [ "network" "directory" "usb" "wayland" ];
  vmms = [ "qemu" "crosvm" ];
  accels = [ "kvm" "tcg" ];
  restarts = [ "no" "on-failure" ];
  arches = [ "x86_64" "aarch64" "ppc64le" ];

  err = path: problem: throw (if path == "" then problem else "${path}: ${problem}");
  join = path: key: if path == "" then key else "${path}.${key}";

  jsonType = v:
    {
      null = "null";
      bool = "a boolean";
      int = "a number";
      float = "a number";
      string = "a string";
      list = "a list";
      set = "an object";
      path = "a path";
      lambda = "a function";
    }.${typeOf v};

  # Python's json.dumps for messages (equal for ASCII strings; Python escapes
  # other characters as \uXXXX, Nix keeps them).
  quote = s: toJSON (unsafeDiscardStringContext s);

  # Python prints a float with a ".0" that Nix's toJSON leaves out.
  showNumber = v:
    let s = toJSON v; in
    if typeOf v == "float" && match ".*[.e].*" s == null then "${s}.0" else s;

  # Force every check fully, left to right, then return `result`: Nix would
  # otherwise evaluate attributes alphabetically, and the first error reported
  # must be the one the daemon reports.
  ordered = checks: result: seq (foldl' (acc: c: deepSeq c acc) null checks) result;

  dropNulls = attrs:
    listToAttrs (
      map (n: { name = n; value = attrs.${n}; }) (filter (n: attrs.${n} != null) (attrNames attrs))
    );

  # -- one JSON object, as the daemon's _Obj ----------------------------------

  obj = path: v: if typeOf v == "set" then v else err path "expected an object, got ${jsonType v}";

  # Absent and null are the same thing, as in the daemon.
  get = o: key: o.${key} or null;

  str = path: o: key: required:
    let
      v = get o key;
      where = join path key;
    in
    if v == null then
      (if required then err where "missing" else null)
    else if typeOf v != "string" then
      err where "expected a string, got ${jsonType v}"
    else
      v;

  int = path: o: key: lo: hi:
    let
      v = get o key;
      where = join path key;
    in
    if v == null then
      null
    else if typeOf v != "int" then
      err where "expected an integer, got ${jsonType v}"
    else if v < lo || v > hi then
      err where "${toString v} is out of range ${toString lo}..${toString hi}"
    else
      v;

  # stop_timeout: a number of seconds in 0..3600 (shown as the daemon's floats).
  seconds = path: o: key:
    let
      v = get o key;
      where = join path key;
    in
    if v == null then
      null
    else if typeOf v != "int" && typeOf v != "float" then
      err where "expected a number, got ${jsonType v}"
    else if v < 0 || v > 3600 then
      err where "${showNumber v} is out of range 0.0..3600.0"
    else
      v;

  bool = path: o: key:
    let
      v = get o key;
    in
    if v == null || typeOf v == "bool" then
      v
    else
      err (join path key) "expected true or false, got ${jsonType v}";

  enum = path: o: key: allowed:
    let
      v = str path o key false;
    in
    if v == null || elem v allowed then
      v
    else
      err (join path key) "${quote v} is not ${concatStringsSep " or " (map toJSON allowed)}";

  # An absolute canonical path. A Nix path value is taken as its string (no
  # copy to the store); a string may carry store context ("${pkg}/bzImage").
  absPath = path: o: key: required:
    let
      raw = get o key;
      v = str path (o // { ${key} = if typeOf raw == "path" then toString raw else raw; }) key required;
      s = unsafeDiscardStringContext v;
      where = join path key;
      parts = filter isString (split "/" s);
    in
    if v == null then
      null
    else if substring 0 1 s != "/" then
      err where "${quote s} is not an absolute path"
    else if
      elem "." parts || elem ".." parts || length (split "//" s) > 1
      || (stringLength s > 1 && substring (stringLength s - 1) 1 s == "/")
    then
      err where "${quote s} is not a canonical path"
    else
      v;

  done = path: o: known:
    let
      unknown = filter (k: !(elem k known) && k != origin) (attrNames o);
    in
    if unknown == [ ] then null else err (join path (head unknown)) "unknown key";

  validName = path: name:
    let
      shown = if stringLength name <= 80 then name else substring 0 77 name + "...";
    in
    if match nameRule name != null then
      name
    else
      err path "invalid name ${quote shown}: names must match ${nameRule}";

  # A section of named objects: each name checked, then its value an object.
  section = top: key:
    let
      raw = get top key;
      sec = if raw == null then { } else obj key raw;
    in
    ordered (concatLists (
      map (n: [ (validName (join key n) n) (obj (join key n) sec.${n}) ]) (attrNames sec)
    )) sec;

  # -- the parts --------------------------------------------------------------

  defaults = path: o:
    let
      out = {
        vmm = enum path o "vmm" vmms;
        accel = enum path o "accel" accels;
        stop_timeout = seconds path o "stop_timeout";
        restart = enum path o "restart" restarts;
      };
    in
    ordered [ out.vmm out.accel out.stop_timeout out.restart (done path o (attrNames out)) ] (
      dropNulls out
    );

  disks = path: o:
    let
      raw = get o "disks";
      where = join path "disks";
      disk = i: d0:
        let
          p = "${where}[${toString i}]";
          d = obj p d0;
          out = {
            path = absPath p d "path" true;
            writable = bool p d "writable";
            overlay = bool p d "overlay";
          };
          overlayWritable =
            if out.overlay == true && out.writable != true then
              err (join p "overlay") "an overlay disk must be writable"
            else
              null;
          # The disks before this one are checked already (ordered, below).
          overlayOnce =
            if out.overlay == true && any (e: get e "overlay" == true) (genList (builtins.elemAt raw) i) then
              err (join p "overlay") "only one disk can hold the overlay"
            else
              null;
        in
        ordered [
          d
          out.path
          out.writable
          out.overlay
          overlayWritable
          overlayOnce
          (done p d (attrNames out))
        ] (dropNulls out);
    in
    if raw == null then
      null
    else if typeOf raw != "list" then
      err where "expected a list, got ${jsonType raw}"
    else if length raw > maxDisks then
      err where "more than ${toString maxDisks} disks"
    else
      let
        ds = genList (i: disk i (builtins.elemAt raw i)) (length raw);
      in
      ordered ds ds;

  application = path: o:
    let
      out = {
        command = str path o "command" true;
        memory_mib = int path o "memory_mib" 64 (1024 * 1024);
        vcpus = int path o "vcpus" 1 256;
        kernel = absPath path o "kernel" false;
        initrd = absPath path o "initrd" false;
        params = str path o "params" false;
        arch = enum path o "arch" arches;
        root_image = absPath path o "root_image" false;
        share_root = bool path o "share_root";
        disks = disks path o;
      };
      commandLength =
        if stringLength out.command > maxCommand then
          err (join path "command") "longer than ${toString maxCommand} bytes"
        else
          null;
      shareRoot =
        if out.share_root == true && out.root_image == null then
          err (join path "share_root") "needs a root_image to share"
        else
          null;
      overlayIndex = if out.disks == null then [ ] else
        filter (i: (builtins.elemAt out.disks i).overlay or false) (genList (i: i) (length out.disks));
      overlayRoot =
        if overlayIndex != [ ] && out.root_image == null then
          err "${join path "disks"}[${toString (head overlayIndex)}].overlay" "needs a root_image"
        else
          null;
      initrdKernel =
        if out.initrd != null && out.kernel == null then
          err (join path "initrd") "an initrd needs a kernel"
        else
          null;
    in
    ordered [
      out.command
      commandLength
      out.memory_mib
      out.vcpus
      out.kernel
      out.initrd
      out.params
      out.arch
      out.root_image
      out.share_root
      out.disks
      shareRoot
      overlayRoot
      initrdKernel
      (done path o (attrNames out))
    ] (dropNulls out);

  usbId = path: o: key:
    let
      v = str path o key true;
    in
    if match "[0-9a-f]{4}" v != null then
      v
    else
      err (join path key) "${quote v} is not 4 lower-case hex digits";

  resource = path: o:
    let
      kind = str path o "type" true;
      finish = checks: out:
        ordered (checks ++ [ (done path o ([ "type" ] ++ attrNames out)) ]) (
          dropNulls ({ type = kind; } // out)
        );
      serial = str path o "serial" false;
      serialOk =
        if serial != null && match "[!-~]{1,126}" serial == null then
          err (join path "serial") "must be 1-126 printable ASCII characters"
        else
          serial;
    in
    if kind == "network" then
      let
        out.host_address = str path o "host_address" false;
      in
      finish [ out.host_address ] out
    else if kind == "directory" then
      let
        out = {
          path = absPath path o "path" true;
          writable = bool path o "writable";
        };
      in
      finish [ out.path out.writable ] out
    else if kind == "usb" then
      let
        out = {
          serial = serialOk;
          vendor = usbId path o "vendor";
          product = usbId path o "product";
        };
      in
      finish [ out.serial out.vendor out.product ] out
    else if kind == "wayland" then
      let
        out.path = absPath path o "path" true;
      in
      finish [ out.path ] out
    else
      err (join path "type")
        "unknown resource type ${quote kind} (known: ${concatStringsSep ", " (map toJSON resourceTypes)})";

  instance = path: o: applications: resources:
    let
      app = str path o "application" true;
      appKnown =
        if elem app applications then app else err (join path "application") "no application ${quote app}";
      raw = get o "resources";
      list = if raw == null then [ ] else raw;
      where = join path "resources";
      item = i:
        let
          r = builtins.elemAt list i;
          p = "${where}[${toString i}]";
        in
        if !(isString r) then
          err p "expected a resource name, got ${jsonType r}"
        else if !(elem r resources) then
          err p "no resource ${quote r}"
        else if elem r (genList (builtins.elemAt list) i) then
          err p "resource ${quote r} is listed twice"
        else
          r;
      checkedResources =
        if typeOf list != "list" then
          err where "expected a list, got ${jsonType list}"
        else
          let
            rs = genList item (length list);
          in
          ordered rs rs;
      out = {
        application = appKnown;
        resources = if raw == null then null else checkedResources;
        vmm = enum path o "vmm" vmms;
        accel = enum path o "accel" accels;
        stop_timeout = seconds path o "stop_timeout";
        restart = enum path o "restart" restarts;
      };
    in
    ordered [
      app
      appKnown
      checkedResources
      out.vmm
      out.accel
      out.stop_timeout
      out.restart
      (done path o (attrNames out))
    ] (dropNulls out);

  instancePath = name: value: value.${origin} or "instances.${name}";

  # What the instance's VMM cannot express (the daemon's _check_backend). The
  # VMM may be left to the daemon's automatic choice; then only the daemon
  # knows it, and only the daemon checks.
  backend = path: o: apps: res: defaultsIn:
    let
      d = if defaultsIn == null then { } else defaultsIn;
      vmm = if get o "vmm" != null then o.vmm else get d "vmm";
      vmmPath =
        join path "vmm" + (if get o "vmm" != null then "" else " (from defaults.vmm)");
      accel =
        if get o "accel" != null then o.accel else if get d "accel" != null then d.accel else "kvm";
      accelPath =
        join path "accel" + (if get o "accel" != null then "" else " (from defaults.accel)");
      app = apps.${o.application};
      arch = if get app "arch" != null then app.arch else "x86_64";
      rlist = if get o "resources" == null then [ ] else o.resources;
      wayland = filter (i: (res.${builtins.elemAt rlist i}.type or null) == "wayland") (
        genList (i: i) (length rlist)
      );
    in
    if vmm == "crosvm" && arch == "ppc64le" then
      err vmmPath "crosvm does not support ppc64le (application ${quote o.application}); use vmm qemu"
    else if vmm == "crosvm" && accel != "kvm" then
      err accelPath "crosvm runs guests only with KVM; use accel kvm or vmm qemu"
    else if
      vmm == "qemu" && (get app "share_root" == true) && get app "root_image" != null
      && arch != "x86_64"
    then
      err vmmPath
        "QEMU 7.2 cannot share a root image on ${arch} (applications.${o.application}.share_root); use vmm crosvm or share_root false"
    else if vmm == "qemu" && wayland != [ ] then
      err "${join path "resources"}[${toString (head wayland)}]"
        "wayland resource ${quote (builtins.elemAt rlist (head wayland))}: QEMU has no virtio-wl; use vmm crosvm (${vmmPath} is qemu)"
    else
      null;

  # -- the whole configuration ------------------------------------------------

  config = untrusted:
    let
      top = obj "" untrusted;
      version = int "" top "version" 1 1;
      defaultsIn = get top "defaults";
      defaultsOut = defaults "defaults" (if defaultsIn == null then { } else obj "defaults" defaultsIn);
      apps = section top "applications";
      appsOut = mapAttrs (n: application "applications.${n}") apps;
      res = section top "resources";
      resOut = mapAttrs (n: resource "resources.${n}") res;
      insts = section top "instances";
      instsOut = mapAttrs (
        n: v: instance (instancePath n v) v (attrNames apps) (attrNames res)
      ) insts;
      backends = mapAttrs (n: v: backend (instancePath n v) v apps res defaultsIn) insts;
      present = key: value: if get top key == null then null else value;
      out = {
        version = version;
        defaults = present "defaults" defaultsOut;
        applications = present "applications" appsOut;
        resources = present "resources" resOut;
        instances = present "instances" instsOut;
      };
    in
    ordered [
      top
      version
      defaultsOut
      apps
      appsOut
      res
      resOut
      insts
      instsOut
      backends
      (done "" top (attrNames out))
    ] (dropNulls out);

  # -- the daemon's data file (STATE_DIR/instances.json) ----------------------

  # Checks the file's own shape; the instances are checked by `config`, where
  # the applications and resources they name are known.
  dataInstances = untrusted:
    let
      data = obj "data" untrusted;
      raw = get data "instances";
      sec = if raw == null then { } else obj "data.instances" raw;
      named = ordered (concatLists (
        map (n: [
          (validName "data.instances.${n}" n)
          (obj "data.instances.${n}" sec.${n})
        ]) (attrNames sec)
      )) sec;
    in
    ordered [
      data
      named
      (int "data" data "version" 1 1)
      (done "data" data [ "version" "instances" ])
    ] (mapAttrs (n: v: v // { ${origin} = "data.instances.${n}"; }) named);

  mergeInstances = configured: imported:
    let
      both = filter (n: configured ? ${n}) (attrNames imported);
      n = head both;
    in
    if both == [ ] then
      configured // imported
    else
      err (instancePath n imported.${n})
        "instance ${quote n} is also defined in the configuration (instances.${n})";
in
{
  inherit config dataInstances mergeInstances;
}
