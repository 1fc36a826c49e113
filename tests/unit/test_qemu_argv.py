"""The VMConfig → QEMU argv translation, without running QEMU."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from kata.hypervisor.base import HypervisorError, SharedFs, VMConfig
from kata.hypervisor.qemu_argv import DEFAULT_SECCOMP, Restore, Vsock, build_argv, kernel_cmdline

RUN = Path("/run/kata/vm1")


def config(**over: object) -> VMConfig:
    base = VMConfig(
        id="vm1",
        hypervisor_path=Path("/usr/bin/qemu-system-x86_64"),
        kernel=Path("/k/vmlinux"),
        image=Path("/k/root.img"),
        initrd=None,
        kernel_params=("quiet",),
        vcpus=1,
        max_vcpus=4,
        memory_mib=512,
        max_memory_mib=2048,
        machine_type="microvm",
        accel="tcg",
        agent_channel="virtio-serial",
        run_dir=RUN,
    )
    return replace(base, **over)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_virtiofs_serial() -> None:
    fs = SharedFs(kind="virtio-fs", host_dir=Path("/s"), tag="kataShared", vhost_user_socket=RUN / "vfs.sock")
    argv = build_argv(config(shared_fs=fs))
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert option(argv, "-machine") == [
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=off,memory-backend=mem"]
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in option(argv, "-object")
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv
    assert option(argv, "-accel") == ["tcg"]
    assert option(argv, "-global") == ["virtio-mmio.force-legacy=false"]
    assert option(argv, "-cpu") == ["qemu64,+rdrand,+arat,+tsc-deadline"]
    # No hotplug on microvm: no spare CPUs or DIMM slots.
    assert option(argv, "-smp") == ["1,maxcpus=1"]
    assert option(argv, "-m") == ["512M"]
    devices = option(argv, "-device")
    assert "virtio-blk-device,drive=rootfs" in devices
    assert "virtio-serial-device,id=vser0,max_ports=2" in devices
    assert "virtserialport,bus=vser0.0,chardev=agent,name=agent.channel.0" in devices
    assert "vhost-user-fs-device,chardev=vfs,tag=kataShared" in devices
    assert not any("-pci" in d for d in devices)
    chardevs = option(argv, "-chardev")
    assert f"socket,id=agent,path={RUN}/agent.sock,server=on,wait=off" in chardevs
    assert f"socket,id=qmp,path={RUN}/qmp.sock,server=on,wait=off" in chardevs
    assert f"socket,id=vfs,path={RUN}/vfs.sock" in chardevs
    # The console is a bounded ring in QEMU's memory, never a file the guest could grow.
    assert "ringbuf,id=console,size=131072" in chardevs
    assert option(argv, "-serial") == ["chardev:console"]
    assert option(argv, "-sandbox") == [DEFAULT_SECCOMP]
    assert "spawn=deny" in DEFAULT_SECCOMP and "elevateprivileges=deny" in DEFAULT_SECCOMP
    assert not any(d.startswith("vmgenid") for d in devices)  # microvm hides it from the guest
    assert "vmgenid,guid=auto" in option(build_argv(config(machine_type="q35")), "-device")
    assert option(argv, "-pidfile") == [f"{RUN}/qemu.pid"]
    assert option(argv, "-drive") == ["file=/k/root.img,if=none,id=rootfs,format=raw,readonly=on"]
    assert option(argv, "-kernel") == ["/k/vmlinux"]
    assert "-initrd" not in argv
    (cmdline,) = option(argv, "-append")
    params = [p for p in cmdline.split() if not p.startswith("tsc_early_khz=")]
    assert params == ["console=ttyS0", "root=/dev/vda", "rootfstype=erofs", "ro", "agent.helper_aslr=off",
                      "quiet"]


def test_q35_9p_vsock() -> None:
    fs = SharedFs(kind="virtio-9p", host_dir=Path("/srv/share"), tag="t9")
    argv = build_argv(
        config(machine_type="q35", agent_channel="vsock", shared_fs=fs, image=None, initrd=Path("/k/initrd")),
        Vsock(cid=42, vhostfd=7),
    )
    assert option(argv, "-machine") == ["q35"]
    assert "-global" not in argv
    assert option(argv, "-smp") == ["1,maxcpus=4"]
    assert option(argv, "-m") == ["512M,slots=8,maxmem=2048M"]
    assert "-object" not in argv  # 9p needs no shared guest memory
    devices = option(argv, "-device")
    assert "vhost-vsock-pci,id=vsock0,guest-cid=42,vhostfd=7" in devices
    assert "virtio-9p-pci,fsdev=fs9p,mount_tag=t9" in devices
    assert not any(d.startswith("virtio-serial") for d in devices)
    assert option(argv, "-fsdev") == ["local,id=fs9p,path=/srv/share,security_model=none,multidevs=remap"]
    assert "-drive" not in argv
    assert option(argv, "-initrd") == ["/k/initrd"]
    (cmdline,) = option(argv, "-append")
    assert "agent.channel=vsock" in cmdline.split()
    assert "root=/dev/vda" not in cmdline


def test_q35_virtiofs_binds_shared_memory_to_machine() -> None:
    fs = SharedFs(kind="virtio-fs", host_dir=Path("/s"), vhost_user_socket=Path("/v.sock"))
    argv = build_argv(config(machine_type="q35", shared_fs=fs))
    assert option(argv, "-machine") == ["q35,memory-backend=mem"]
    assert "vhost-user-fs-pci,chardev=vfs,tag=kataShared" in option(argv, "-device")
    assert "virtio-serial-pci,id=vser0,max_ports=2" in option(argv, "-device")


def test_kvm_uses_host_cpu_tcg_does_not() -> None:
    kvm = build_argv(config(accel="kvm"))
    assert option(kvm, "-accel") == ["kvm"]
    assert option(kvm, "-cpu") == ["host"]
    tcg = build_argv(config(accel="tcg"))
    # TCG keeps its cheap default model, plus RDRAND so the guest has entropy at once, and ARAT so
    # that an idle guest can stop its tick.
    assert option(tcg, "-cpu")[0].split(",")[:3] == ["qemu64", "+rdrand", "+arat"]


def test_helpers_run_at_fixed_addresses_under_tcg_only() -> None:
    for machine in ("microvm", "q35"):
        assert "agent.helper_aslr=off" in kernel_cmdline(config(machine_type=machine), vsock=False).split()
        kvm = kernel_cmdline(config(machine_type=machine, accel="kvm"), vsock=False)
        assert "agent.helper_aslr" not in kvm
    # A caller's own value wins, as for every driver parameter.
    mine = kernel_cmdline(config(kernel_params=("agent.helper_aslr=on",)), vsock=False).split()
    assert "agent.helper_aslr=on" in mine and "agent.helper_aslr=off" not in mine


def test_no_memory_hotplug_when_max_equals_memory() -> None:
    argv = build_argv(config(machine_type="pc", max_memory_mib=512))
    assert option(argv, "-m") == ["512M"]
    assert "virtio-blk-pci,drive=rootfs" in option(argv, "-device")


def test_caller_params_override_driver_defaults() -> None:
    line = kernel_cmdline(config(kernel_params=("console=hvc0", "root=/dev/vdb")), vsock=False).split()
    assert [p for p in line if not p.startswith("tsc_early_khz=")] == [
        "rootfstype=erofs", "ro", "agent.helper_aslr=off", "console=hvc0", "root=/dev/vdb"]


def test_tcg_microvm_gets_the_tsc_rate() -> None:
    def has_tsc(accel: str) -> bool:
        line = kernel_cmdline(config(accel=accel), vsock=False)
        return any(p.startswith("tsc_early_khz=") for p in line.split())

    assert has_tsc("tcg") and not has_tsc("kvm")


def test_extra_args_come_last() -> None:
    assert build_argv(config(extra_args=("-S",)))[-1] == "-S"


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"machine_type": "virt"}, "unsupported machine type"),
        ({"vcpus": 5}, "max_vcpus"),
        ({"memory_mib": 4096}, "max_memory_mib"),
        ({"shared_fs": SharedFs(kind="virtio-fs", host_dir=Path("/s"))}, "virtiofsd socket"),
        ({"agent_channel": "vsock"}, "guest cid"),
    ],
)
def test_invalid_configs_give_one_line_errors(over: dict[str, object], message: str) -> None:
    with pytest.raises(HypervisorError, match=message) as info:
        build_argv(config(**over))
    assert "\n" not in str(info.value)


def test_restore_reads_state_through_an_inherited_fd() -> None:
    # No exec: transport (the seccomp filter forbids QEMU to spawn anything).
    argv = build_argv(config(extra_args=("-S",)), restore=Restore(state_fd=7))
    assert option(argv, "-incoming") == ["fd:7"]
    assert argv[-1] == "-S"
    assert "-sandbox" not in build_argv(config(), seccomp="")


def test_clone_maps_its_memfd_and_defers_the_state() -> None:
    fs = SharedFs("virtio-fs", Path("/share"), vhost_user_socket=Path("/run/vfs.sock"), hotplug=True)
    argv = build_argv(config(shared_fs=fs), restore=Restore(state_fd=7, memory_fd=9))
    assert "memory-backend-file,id=mem,size=512M,mem-path=/proc/self/fd/9,share=on" in option(argv, "-object")
    assert option(argv, "-incoming") == ["defer"]  # the state follows over QMP, after x-ignore-shared


def test_hot_added_virtio_fs_gets_a_root_port_not_a_device() -> None:
    from kata.hypervisor.base import SharedFs

    fs = SharedFs("virtio-fs", Path("/share"), vhost_user_socket=Path("/run/vfs.sock"), hotplug=True)
    argv = build_argv(config(shared_fs=fs))
    machine = option(argv, "-machine")[0]
    assert "pcie=on" in machine and "memory-backend=mem" in machine
    devices = option(argv, "-device")
    assert any(d.startswith("pcie-root-port,id=fsport") for d in devices)
    assert not any("vhost-user-fs" in d for d in devices)
    assert "pcie_ports=native" in kernel_cmdline(config(shared_fs=fs), vsock=False).split()


def test_a_9p_clone_maps_the_template_copy_on_write() -> None:
    fs = SharedFs("virtio-9p", Path("/share"))
    argv = build_argv(config(shared_fs=fs), restore=Restore(state_fd=7, memory_path=Path("/t/memory")))
    assert "memory-backend-file,id=mem,size=512M,mem-path=/t/memory,share=off" in option(argv, "-object")
    assert "memory-backend=mem" in option(argv, "-machine")[0]
    assert option(argv, "-incoming") == ["defer"]


def test_a_virtio_fs_clone_cannot_be_copy_on_write() -> None:
    fs = SharedFs("virtio-fs", Path("/share"), vhost_user_socket=Path("/run/vfs.sock"), hotplug=True)
    with pytest.raises(HypervisorError, match="vhost-user needs shared RAM"):
        build_argv(config(shared_fs=fs), restore=Restore(state_fd=7, memory_path=Path("/t/memory")))


def test_a_copy_on_write_clone_never_reports_freed_memory() -> None:
    # QEMU 7.2 discards a reported page of a file-backed RAM block by punching a hole in the file:
    # here the template's, under every other clone.
    fs = SharedFs("virtio-9p", Path("/share"))
    with pytest.raises(HypervisorError, match="cannot report freed memory"):
        build_argv(config(shared_fs=fs, free_page_reporting=True),
                   restore=Restore(state_fd=7, memory_path=Path("/t/memory")))


@pytest.mark.parametrize(("machine", "device"),
                         [("microvm", "virtio-balloon-device"), ("q35", "virtio-balloon-pci")])
def test_free_page_reporting_is_a_balloon_that_only_reports(machine: str, device: str) -> None:
    fs = SharedFs("virtio-fs", Path("/share"), vhost_user_socket=Path("/run/vfs.sock"), hotplug=True)
    devices = option(build_argv(config(machine_type=machine, shared_fs=fs, free_page_reporting=True),
                                restore=Restore(state_fd=7, memory_fd=9)), "-device")
    assert f"{device},id=balloon0,free-page-reporting=on" in devices
    assert not any("balloon" in d for d in option(build_argv(config(machine_type=machine)), "-device"))


def test_a_9p_template_keeps_its_ram_in_a_shared_file() -> None:
    argv = build_argv(config(shared_fs=SharedFs("virtio-9p", Path("/share")), memory_file=Path("/t/memory")))
    assert "memory-backend-file,id=mem,size=512M,mem-path=/t/memory,share=on" in option(argv, "-object")


IMAGE_SIZE = 100 << 20  # a multiple of 2 MiB, as kata.osbuilder pads its images


def test_image_as_persistent_memory_after_ram() -> None:
    fs = SharedFs(kind="virtio-fs", host_dir=Path("/s"), tag="kataShared", vhost_user_socket=RUN / "vfs.sock")
    argv = build_argv(config(shared_fs=fs, image_pmem_size=IMAGE_SIZE))
    # RAM first (the guest's own), the image right after it, read-only and shared, then a little
    # RAM for the firmware's tables, reserved to the guest kernel.
    assert option(argv, "-m") == ["616M"]
    # PCIe on microvm: Linux registers legacy persistent memory only in its PCI resource survey.
    assert option(argv, "-machine") == ["microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=off,pcie=on"]
    assert option(argv, "-object") == [
        "memory-backend-memfd,id=mem,size=512M,share=on",
        f"memory-backend-file,id=rootfs,mem-path=/k/root.img,size={IMAGE_SIZE},share=on,readonly=on",
        "memory-backend-ram,id=top,size=4M"]
    assert option(argv, "-numa") == [
        "node,nodeid=0,memdev=mem", "node,nodeid=1,memdev=rootfs", "node,nodeid=2,memdev=top"]
    assert "-drive" not in argv
    assert not any("virtio-blk" in d for d in option(argv, "-device"))
    params = option(argv, "-append")[0].split()
    assert params[:8] == ["console=ttyS0", "memmap=100M!512M", "memmap=4M$612M", "root=/dev/pmem0",
                          "rootfstype=erofs", "rootflags=dax=always", "ro", "rootwait"]


def test_image_as_persistent_memory_with_anonymous_ram() -> None:
    argv = build_argv(config(image_pmem_size=IMAGE_SIZE))
    # NUMA nodes need a backend for RAM too.
    assert option(argv, "-object")[0] == "memory-backend-ram,id=mem,size=512M"
    assert option(argv, "-m") == ["616M"]


def test_persistent_memory_up_to_2_gib() -> None:
    # 1944 MiB of RAM, the image and the firmware's 4 MiB: exactly 2 GiB.
    argv = build_argv(config(image_pmem_size=IMAGE_SIZE, memory_mib=1944, max_memory_mib=1944))
    assert option(argv, "-m") == ["2048M"]
    assert "memmap=4M$2044M" in option(argv, "-append")[0].split()


@pytest.mark.parametrize("over", [
    {"image_pmem_size": 0},
    {"image_pmem_size": IMAGE_SIZE + 4096},  # not padded: QEMU maps a read-only file only whole
    {"image_pmem_size": IMAGE_SIZE, "memory_mib": 1946},  # past 2 GiB with the image
    {"image_pmem_size": IMAGE_SIZE, "memory_mib": 613},  # the image would start inside a 2 MiB section
    {"image_pmem_size": IMAGE_SIZE, "kernel_params": ("memmap=64M$1G",)},  # would undo the layout
    {"image_pmem_size": IMAGE_SIZE, "kernel_params": ("root=/dev/vda",)},
    {"image_pmem_size": IMAGE_SIZE, "kernel_params": ("rootflags=noacl",)},
    {"image_pmem_size": IMAGE_SIZE, "image": None, "initrd": Path("/k/initrd")},
    {"image_pmem_size": IMAGE_SIZE, "initrd": Path("/k/initrd")},  # QEMU loads it where the image would be
    {"image_pmem_size": IMAGE_SIZE, "machine_type": "q35"},
])
def test_image_on_a_disk_where_persistent_memory_does_not_fit(over: dict[str, object]) -> None:
    argv = build_argv(config(**over))
    assert "-numa" not in argv
    cmdline = option(argv, "-append")[0]
    assert "pmem" not in cmdline and "dax" not in cmdline
    assert "memmap=" not in cmdline or over.get("kernel_params")
    assert ("-drive" in argv) == (over.get("image", Path("/k/root.img")) is not None)


def test_restoring_a_vm_with_its_image_in_persistent_memory_defers_the_state() -> None:
    # Even with RAM in the state, x-ignore-shared must be set first: the image is read-only.
    argv = build_argv(config(image_pmem_size=IMAGE_SIZE), restore=Restore(state_fd=7))
    assert option(argv, "-incoming") == ["defer"]


def test_a_comma_in_a_path_stays_in_the_path() -> None:
    # QEMU reads an undoubled comma as the next option: an image named by an annotation could
    # otherwise add its own (readonly=off on a shared mapping of a host file).
    image = Path("/k/root,readonly=off.img")
    disk = build_argv(config(image=image))
    assert option(disk, "-drive") == [
        "file=/k/root,,readonly=off.img,if=none,id=rootfs,format=raw,readonly=on"]
    pmem = build_argv(config(image=image, image_pmem_size=IMAGE_SIZE))
    assert (f"memory-backend-file,id=rootfs,mem-path=/k/root,,readonly=off.img,size={IMAGE_SIZE},"
            "share=on,readonly=on") in option(pmem, "-object")
    fs = SharedFs(kind="virtio-9p", host_dir=Path("/s,x"), tag="kataShared")
    assert "local,id=fs9p,path=/s,,x,security_model=none,multidevs=remap" in option(
        build_argv(config(shared_fs=fs, run_dir=Path("/run/a,b"))), "-fsdev")
    assert "socket,id=qmp,path=/run/a,,b/qmp.sock,server=on,wait=off" in option(
        build_argv(config(run_dir=Path("/run/a,b"))), "-chardev")


@pytest.mark.parametrize("pmem_size", [IMAGE_SIZE, 0])
def test_qemu_opens_the_image_through_the_descriptor_it_inherits(pmem_size: int) -> None:
    """The file QEMU maps (or reads as a disk) is the one the runtime opened and checked, whatever the
    path names by the time QEMU opens it; a template's key keeps the path."""
    argv = build_argv(config(image_pmem_size=pmem_size), image_fd=9)
    assert "/k/root.img" not in " ".join(argv)
    if pmem_size:
        assert any(o.startswith("memory-backend-file,id=rootfs,mem-path=/proc/self/fd/9,")
                   for o in option(argv, "-object"))
    else:
        assert option(argv, "-drive") == ["file=/proc/self/fd/9,if=none,id=rootfs,format=raw,readonly=on"]
    assert "/k/root.img" in " ".join(build_argv(config(image_pmem_size=pmem_size)))


def test_the_image_is_checked_when_qemu_is_handed_it(tmp_path: Path) -> None:
    import os

    from kata.hypervisor.qemu import open_image

    image = tmp_path / "root.img"
    image.write_bytes(b"\0" * 4096)
    os.truncate(image, IMAGE_SIZE)
    fd = open_image(config(image=image, image_pmem_size=IMAGE_SIZE))
    assert os.fstat(fd).st_size == IMAGE_SIZE
    os.close(fd)
    # Replaced by another build between the plan and the start: the guest would be told the wrong size.
    os.truncate(image, IMAGE_SIZE + (2 << 20))
    with pytest.raises(HypervisorError, match="changed while the VM was planned"):
        open_image(config(image=image, image_pmem_size=IMAGE_SIZE))
    os.close(open_image(config(image=image, image_pmem_size=0)))  # a disk: any size
    image.unlink()
    os.mkfifo(image)  # never waited on
    with pytest.raises(HypervisorError, match="is not a file or a block device"):
        open_image(config(image=image))
    with pytest.raises(HypervisorError, match="No such file"):
        open_image(config(image=tmp_path / "missing.img"))
