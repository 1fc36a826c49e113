"""containerd's .proto files, staged from Debian's packages: Go-only options gone, the wire format kept."""

from kata.protocols import containerd_protos


def test_rewrite_drops_go_only_options_and_moves_imports() -> None:
    text = '''syntax = "proto3";
package containerd.task.v2;
import weak "gogoproto/gogo.proto";
import "github.com/gogo/protobuf/gogoproto/gogo.proto";
import weak "github.com/containerd/containerd/protobuf/plugin/fieldpath.proto";
import "google/protobuf/any.proto";
import "github.com/containerd/containerd/api/types/mount.proto";
option (gogoproto.goproto_getters_all) = false;
message DeleteResponse {
\tuint32 pid = 1;
\tgoogle.protobuf.Timestamp exited_at = 3 [(gogoproto.stdtime) = true,
\t\t(gogoproto.nullable) = false];
}
'''
    out = containerd_protos.rewrite(text)
    assert "gogoproto" not in out and "fieldpath" not in out
    assert 'import "google/protobuf/any.proto";' in out
    assert 'import "kata/protocols/containerd/api/types/mount.proto";' in out
    assert "google.protobuf.Timestamp exited_at = 3;" in out
    assert "package containerd.task.v2;" in out


def test_generated_task_api_has_containerd_names_and_numbers() -> None:
    from kata.protocols.containerd.runtime.v2.task import shim_pb2

    service = shim_pb2.DESCRIPTOR.services_by_name["Task"]
    assert service.full_name == "containerd.task.v2.Task"
    assert {m.name for m in service.methods} >= {
        "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill", "Exec",
        "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown"}
    fields = {f.name: f.number for f in shim_pb2.CreateTaskRequest.DESCRIPTOR.fields}
    assert fields["rootfs"] == 3 and fields["stdout"] == 6 and fields["options"] == 10
