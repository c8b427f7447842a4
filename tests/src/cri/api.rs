//! The `runtime.v1` messages the tests exchange with a container runtime, written by hand from
//! kubernetes/cri-api `pkg/apis/runtime/v1/api.proto` (field numbers and types as there; fields
//! the tests never read or set are left out, and the decoder skips them). prost's encoding
//! functions do the wire format; its derive macro is not used, because it would give the
//! workspace's `syn` a feature the static istio-iptables link then builds `syn` again without.

use std::collections::HashMap;

use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType};
use prost::DecodeError;

/// How one field's Rust type is put on the wire (proto3: a scalar at its default is left out).
pub trait Field {
    fn encode(&self, tag: u32, buf: &mut impl BufMut);
    fn merge(&mut self, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError>;
    fn encoded_len(&self, tag: u32) -> usize;
}

/// Scalars: `string`, `bool`, `uint32`, `int32` (also enums), `int64`.
macro_rules! scalar_fields {
    ($($ty:ty => $proto:ident),*) => {$(
        impl Field for $ty {
            fn encode(&self, tag: u32, buf: &mut impl BufMut) {
                if *self != <$ty>::default() {
                    encoding::$proto::encode(tag, self, buf);
                }
            }
            fn merge(&mut self, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
                encoding::$proto::merge(wire_type, self, buf, ctx)
            }
            fn encoded_len(&self, tag: u32) -> usize {
                if *self == <$ty>::default() { 0 } else { encoding::$proto::encoded_len(tag, self) }
            }
        }
    )*};
}
scalar_fields!(String => string, bool => bool, u32 => uint32, i32 => int32, i64 => int64);

/// The messages declared here. Only they are `repeated` as messages: prost also implements
/// [`prost::Message`] for `String` (the `StringValue` wrapper), which must not decide how a
/// `repeated string` goes on the wire.
pub trait CriMessage: prost::Message + Default {}

/// An embedded message.
impl<M: prost::Message + Default> Field for Option<M> {
    fn encode(&self, tag: u32, buf: &mut impl BufMut) {
        if let Some(message) = self {
            encoding::message::encode(tag, message, buf);
        }
    }
    fn merge(&mut self, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
        encoding::message::merge(wire_type, self.get_or_insert_with(M::default), buf, ctx)
    }
    fn encoded_len(&self, tag: u32) -> usize {
        self.as_ref().map_or(0, |message| encoding::message::encoded_len(tag, message))
    }
}

/// `repeated` messages.
impl<M: CriMessage> Field for Vec<M> {
    fn encode(&self, tag: u32, buf: &mut impl BufMut) {
        encoding::message::encode_repeated(tag, self, buf);
    }
    fn merge(&mut self, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
        encoding::message::merge_repeated(wire_type, self, buf, ctx)
    }
    fn encoded_len(&self, tag: u32) -> usize {
        encoding::message::encoded_len_repeated(tag, self)
    }
}

/// `repeated string`.
impl Field for Vec<String> {
    fn encode(&self, tag: u32, buf: &mut impl BufMut) {
        encoding::string::encode_repeated(tag, self, buf);
    }
    fn merge(&mut self, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
        encoding::string::merge_repeated(wire_type, self, buf, ctx)
    }
    fn encoded_len(&self, tag: u32) -> usize {
        encoding::string::encoded_len_repeated(tag, self)
    }
}

/// `map<string, string>`.
impl Field for HashMap<String, String> {
    fn encode(&self, tag: u32, buf: &mut impl BufMut) {
        let (put, len) = (encoding::string::encode, encoding::string::encoded_len);
        encoding::hash_map::encode(put, len, put, len, tag, self, buf);
    }
    fn merge(&mut self, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
        encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
        encoding::hash_map::merge(encoding::string::merge, encoding::string::merge, self, buf, ctx)
    }
    fn encoded_len(&self, tag: u32) -> usize {
        let len = encoding::string::encoded_len;
        encoding::hash_map::encoded_len(len, len, tag, self)
    }
}

/// Declares messages as structs of [`Field`]s, each with its field number, and implements
/// [`prost::Message`] for them.
macro_rules! messages {
    ($($(#[$doc:meta])* pub struct $name:ident { $($(#[$field_doc:meta])* $tag:literal => $field:ident: $ty:ty,)* })*) => {$(
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct $name {
            $($(#[$field_doc])* pub $field: $ty,)*
        }

        impl CriMessage for $name {}

        impl prost::Message for $name {
            fn encode_raw(&self, _buf: &mut impl BufMut) {
                $(Field::encode(&self.$field, $tag, _buf);)*
            }
            fn merge_field(
                &mut self,
                tag: u32,
                wire_type: WireType,
                buf: &mut impl Buf,
                ctx: DecodeContext,
            ) -> Result<(), DecodeError> {
                match tag {
                    $($tag => Field::merge(&mut self.$field, wire_type, buf, ctx),)*
                    _ => encoding::skip_field(wire_type, tag, buf, ctx),
                }
            }
            fn encoded_len(&self) -> usize {
                0 $(+ Field::encoded_len(&self.$field, $tag))*
            }
            fn clear(&mut self) {
                *self = Self::default();
            }
        }
    )*};
}

/// `NamespaceMode`, sent as its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum NamespaceMode {
    Pod = 0,
    Container = 1,
    Node = 2,
    Target = 3,
}

/// `ContainerState`, received as its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ContainerState {
    Created = 0,
    Running = 1,
    Exited = 2,
    Unknown = 3,
}

/// `PodSandboxState`, received as its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum PodSandboxState {
    SandboxReady = 0,
    SandboxNotready = 1,
}

messages! {
    pub struct VersionRequest {
        1 => version: String,
    }

    pub struct VersionResponse {
        1 => version: String,
        2 => runtime_name: String,
        3 => runtime_version: String,
        4 => runtime_api_version: String,
    }

    pub struct StatusRequest {
        1 => verbose: bool,
    }

    pub struct StatusResponse {
        1 => status: Option<RuntimeStatus>,
        /// Verbose only; containerd's `cniconfig` is the CNI configuration it has loaded (JSON).
        2 => info: HashMap<String, String>,
    }

    pub struct RuntimeStatus {
        1 => conditions: Vec<RuntimeCondition>,
    }

    pub struct RuntimeCondition {
        /// `RuntimeReady` or `NetworkReady`.
        1 => r#type: String,
        2 => status: bool,
        3 => reason: String,
        4 => message: String,
    }

    pub struct NamespaceOption {
        /// A [`NamespaceMode`].
        1 => network: i32,
        /// A [`NamespaceMode`].
        2 => pid: i32,
        /// A [`NamespaceMode`].
        3 => ipc: i32,
    }

    pub struct LinuxSandboxSecurityContext {
        1 => namespace_options: Option<NamespaceOption>,
    }

    pub struct LinuxPodSandboxConfig {
        1 => cgroup_parent: String,
        2 => security_context: Option<LinuxSandboxSecurityContext>,
    }

    pub struct PodSandboxMetadata {
        1 => name: String,
        2 => uid: String,
        3 => namespace: String,
        4 => attempt: u32,
    }

    pub struct PodSandboxConfig {
        1 => metadata: Option<PodSandboxMetadata>,
        2 => hostname: String,
        3 => log_directory: String,
        6 => labels: HashMap<String, String>,
        /// The pod's annotations; containerd hands them to CNI plugins that declare the
        /// `io.kubernetes.cri.pod-annotations` capability.
        7 => annotations: HashMap<String, String>,
        8 => linux: Option<LinuxPodSandboxConfig>,
    }

    pub struct RunPodSandboxRequest {
        1 => config: Option<PodSandboxConfig>,
        2 => runtime_handler: String,
    }

    pub struct RunPodSandboxResponse {
        1 => pod_sandbox_id: String,
    }

    /// The request of StopPodSandbox and RemovePodSandbox alike.
    pub struct PodSandboxIdRequest {
        1 => pod_sandbox_id: String,
    }

    /// The (empty) response of StopPodSandbox, RemovePodSandbox and the container calls.
    pub struct Empty {}

    pub struct PodSandboxStatusRequest {
        1 => pod_sandbox_id: String,
        2 => verbose: bool,
    }

    pub struct PodSandboxStatusResponse {
        1 => status: Option<PodSandboxStatus>,
        /// Verbose only; containerd's `info` holds the sandbox's OCI spec (namespace paths) as JSON.
        2 => info: HashMap<String, String>,
    }

    pub struct PodSandboxStatus {
        1 => id: String,
        2 => metadata: Option<PodSandboxMetadata>,
        /// A [`PodSandboxState`].
        3 => state: i32,
        5 => network: Option<PodSandboxNetworkStatus>,
        7 => labels: HashMap<String, String>,
        8 => annotations: HashMap<String, String>,
    }

    pub struct PodSandboxNetworkStatus {
        1 => ip: String,
        2 => additional_ips: Vec<PodIp>,
    }

    pub struct PodIp {
        1 => ip: String,
    }

    pub struct ListPodSandboxRequest {
        1 => filter: Option<PodSandboxFilter>,
    }

    pub struct PodSandboxFilter {
        1 => id: String,
        3 => label_selector: HashMap<String, String>,
    }

    pub struct ListPodSandboxResponse {
        1 => items: Vec<PodSandbox>,
    }

    pub struct PodSandbox {
        1 => id: String,
        2 => metadata: Option<PodSandboxMetadata>,
        /// A [`PodSandboxState`].
        3 => state: i32,
        5 => labels: HashMap<String, String>,
    }

    pub struct ImageSpec {
        1 => image: String,
    }

    pub struct ImageStatusRequest {
        1 => image: Option<ImageSpec>,
    }

    pub struct ImageStatusResponse {
        /// Absent when the runtime does not have the image.
        1 => image: Option<Image>,
    }

    pub struct Image {
        1 => id: String,
    }

    pub struct ContainerMetadata {
        1 => name: String,
        2 => attempt: u32,
    }

    /// A host path bound into a container.
    pub struct Mount {
        1 => container_path: String,
        2 => host_path: String,
        3 => readonly: bool,
    }

    pub struct Capability {
        1 => add_capabilities: Vec<String>,
        2 => drop_capabilities: Vec<String>,
    }

    /// Present or absent, unlike a plain `int64` (uid 0 is a value).
    pub struct Int64Value {
        1 => value: i64,
    }

    pub struct LinuxContainerSecurityContext {
        1 => capabilities: Option<Capability>,
        5 => run_as_user: Option<Int64Value>,
        7 => readonly_rootfs: bool,
        11 => no_new_privs: bool,
        12 => run_as_group: Option<Int64Value>,
    }

    pub struct LinuxContainerConfig {
        2 => security_context: Option<LinuxContainerSecurityContext>,
    }

    pub struct ContainerConfig {
        1 => metadata: Option<ContainerMetadata>,
        2 => image: Option<ImageSpec>,
        /// The entrypoint, replacing the image's.
        3 => command: Vec<String>,
        4 => args: Vec<String>,
        7 => mounts: Vec<Mount>,
        /// Relative to the sandbox's `log_directory`.
        11 => log_path: String,
        15 => linux: Option<LinuxContainerConfig>,
    }

    pub struct CreateContainerRequest {
        1 => pod_sandbox_id: String,
        2 => config: Option<ContainerConfig>,
        /// The sandbox's own configuration, again (as a kubelet sends it).
        3 => sandbox_config: Option<PodSandboxConfig>,
    }

    pub struct CreateContainerResponse {
        1 => container_id: String,
    }

    /// The request of StartContainer and RemoveContainer alike.
    pub struct ContainerIdRequest {
        1 => container_id: String,
    }

    pub struct StopContainerRequest {
        1 => container_id: String,
        /// Seconds between the stop signal and SIGKILL.
        2 => timeout: i64,
    }

    pub struct ContainerStatusRequest {
        1 => container_id: String,
        2 => verbose: bool,
    }

    pub struct ContainerStatusResponse {
        1 => status: Option<ContainerStatus>,
    }

    pub struct ContainerStatus {
        1 => id: String,
        /// A [`ContainerState`].
        3 => state: i32,
        7 => exit_code: i32,
        10 => reason: String,
        11 => message: String,
        15 => log_path: String,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn fields_go_on_the_wire_as_protobuf_puts_them() {
        let metadata = PodSandboxMetadata { name: "a".into(), attempt: 1, ..Default::default() };
        // Field 1, length-delimited: "a"; field 4, varint: 1. Empty strings are left out.
        assert_eq!(metadata.encode_to_vec(), [0x0a, 1, b'a', 0x20, 1]);
        let config = PodSandboxConfig { annotations: [("k".into(), "v".into())].into(), ..Default::default() };
        // Field 7, one map entry: key (1) "k", value (2) "v".
        assert_eq!(config.encode_to_vec(), [0x3a, 6, 0x0a, 1, b'k', 0x12, 1, b'v']);
        assert_eq!(PodSandboxConfig::decode(config.encode_to_vec().as_slice()).unwrap(), config);
    }

    #[test]
    fn repeated_strings_and_wrapped_zeros_go_on_the_wire_as_protobuf_puts_them() {
        let capabilities = Capability { add_capabilities: vec!["A".into(), String::new()], ..Default::default() };
        // Field 1 twice, each a string: a repeated element is never left out, even empty (not a
        // `StringValue` message, which would read [0x0a, 3, 0x0a, 1, b'A', ...]).
        assert_eq!(capabilities.encode_to_vec(), [0x0a, 1, b'A', 0x0a, 0]);
        assert_eq!(Capability::decode(capabilities.encode_to_vec().as_slice()).unwrap(), capabilities);
        // uid 0 is sent: field 5, an empty message. An absent uid sends nothing.
        let root = LinuxContainerSecurityContext { run_as_user: Some(Int64Value { value: 0 }), ..Default::default() };
        assert_eq!(root.encode_to_vec(), [0x2a, 0]);
        assert_eq!(LinuxContainerSecurityContext::default().encode_to_vec(), [] as [u8; 0]);
    }

    #[test]
    fn unknown_fields_are_skipped_and_truncated_ones_refused() {
        // PodSandboxStatus: id (1) "x", created_at (4, not declared here) 7, state (3) 1.
        let status = PodSandboxStatus::decode([0x0a, 1, b'x', 0x20, 7, 0x18, 1].as_slice()).unwrap();
        assert_eq!((status.id.as_str(), status.state), ("x", PodSandboxState::SandboxNotready as i32));
        let response = PodSandboxStatusResponse::decode([0x0a, 3, 0x0a, 1, b'y'].as_slice()).unwrap();
        assert_eq!(response.status.unwrap().id, "y");
        assert!(PodSandboxStatus::decode([0x0a, 5, b'x'].as_slice()).is_err(), "a truncated field is an error");
    }
}
