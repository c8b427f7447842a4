//! A small CRI client: the calls a kubelet makes for a pod's network, sent to a container
//! runtime's socket as gRPC over HTTP/2 (h2), with hand-written `runtime.v1` messages
//! ([`api`], encoded by prost). Each call blocks, and fails after [`CALL_TIMEOUT`] rather than
//! hang a test.

pub mod api;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;
use thiserror::Error;

use api::*;

/// Longest a call may take; RunPodSandbox runs the whole CNI chain.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum CriError {
    /// The runtime answered with a gRPC error status.
    #[error("{method}: {message} (gRPC status {code})")]
    Status { method: &'static str, code: u32, message: String },
    /// The call never got an answer: connection, HTTP/2 or framing trouble, or the timeout.
    #[error("{method}: {detail}")]
    Transport { method: &'static str, detail: String },
}

/// A connection to one runtime's CRI socket.
pub struct CriClient {
    runtime: tokio::runtime::Runtime,
    channel: h2::client::SendRequest<Bytes>,
}

impl CriClient {
    pub fn connect(socket: &Path) -> Result<CriClient, CriError> {
        let failed = |detail: String| CriError::Transport { method: "connect", detail };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed(format!("tokio runtime: {e}")))?;
        let channel = runtime.block_on(async {
            let stream =
                tokio::net::UnixStream::connect(socket).await.map_err(|e| failed(format!("{}: {e}", socket.display())))?;
            let (channel, connection) =
                h2::client::handshake(stream).await.map_err(|e| failed(format!("HTTP/2 handshake: {e}")))?;
            // Driven whenever a call runs the runtime; ends with the client.
            tokio::spawn(connection);
            Ok::<_, CriError>(channel)
        })?;
        Ok(CriClient { runtime, channel })
    }

    pub fn version(&self) -> Result<VersionResponse, CriError> {
        self.call("/runtime.v1.RuntimeService/Version", &VersionRequest { version: "v1".into() })
    }

    /// The runtime's conditions and (verbose) its loaded configuration.
    pub fn status(&self) -> Result<StatusResponse, CriError> {
        self.call("/runtime.v1.RuntimeService/Status", &StatusRequest { verbose: true })
    }

    /// Creates the sandbox and its network (the CNI chain's ADD); returns its id.
    pub fn run_pod_sandbox(&self, config: &PodSandboxConfig) -> Result<String, CriError> {
        let request = RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: String::new() };
        let response: RunPodSandboxResponse = self.call("/runtime.v1.RuntimeService/RunPodSandbox", &request)?;
        Ok(response.pod_sandbox_id)
    }

    /// Verbose status: with containerd, `info` holds the sandbox's spec and so its netns path.
    pub fn pod_sandbox_status(&self, id: &str) -> Result<PodSandboxStatusResponse, CriError> {
        let request = PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: true };
        self.call("/runtime.v1.RuntimeService/PodSandboxStatus", &request)
    }

    /// Kills the sandbox and tears its network down (DEL with the namespace path).
    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let _: Empty =
            self.call("/runtime.v1.RuntimeService/StopPodSandbox", &PodSandboxIdRequest { pod_sandbox_id: id.into() })?;
        Ok(())
    }

    /// Stops the sandbox again (a second DEL, without a namespace once it is gone) and deletes it.
    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let request = PodSandboxIdRequest { pod_sandbox_id: id.into() };
        let _: Empty = self.call("/runtime.v1.RuntimeService/RemovePodSandbox", &request)?;
        Ok(())
    }

    pub fn list_pod_sandbox(&self, filter: Option<PodSandboxFilter>) -> Result<Vec<PodSandbox>, CriError> {
        let response: ListPodSandboxResponse =
            self.call("/runtime.v1.RuntimeService/ListPodSandbox", &ListPodSandboxRequest { filter })?;
        Ok(response.items)
    }

    /// Creates a container in the sandbox `pod_sandbox_id` (configured with `sandbox`); returns its id.
    pub fn create_container(
        &self,
        pod_sandbox_id: &str,
        config: &ContainerConfig,
        sandbox: &PodSandboxConfig,
    ) -> Result<String, CriError> {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod_sandbox_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox.clone()),
        };
        let response: CreateContainerResponse = self.call("/runtime.v1.RuntimeService/CreateContainer", &request)?;
        Ok(response.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        let _: Empty = self.call("/runtime.v1.RuntimeService/StartContainer", &ContainerIdRequest { container_id: id.into() })?;
        Ok(())
    }

    /// Sends the stop signal, and SIGKILL after `timeout_seconds`.
    pub fn stop_container(&self, id: &str, timeout_seconds: i64) -> Result<(), CriError> {
        let request = StopContainerRequest { container_id: id.into(), timeout: timeout_seconds };
        let _: Empty = self.call("/runtime.v1.RuntimeService/StopContainer", &request)?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let _: Empty =
            self.call("/runtime.v1.RuntimeService/RemoveContainer", &ContainerIdRequest { container_id: id.into() })?;
        Ok(())
    }

    pub fn container_status(&self, id: &str) -> Result<ContainerStatus, CriError> {
        let request = ContainerStatusRequest { container_id: id.into(), verbose: false };
        let response: ContainerStatusResponse = self.call("/runtime.v1.RuntimeService/ContainerStatus", &request)?;
        Ok(response.status.unwrap_or_default())
    }

    /// The image as the runtime's CRI service knows it, if it does.
    pub fn image_status(&self, image: &str) -> Result<Option<Image>, CriError> {
        let request = ImageStatusRequest { image: Some(ImageSpec { image: image.into() }) };
        let response: ImageStatusResponse = self.call("/runtime.v1.ImageService/ImageStatus", &request)?;
        Ok(response.image)
    }

    /// One unary gRPC call: a length-prefixed message out, one back, the status in the trailers
    /// (or, for a "trailers-only" error, in the headers).
    fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &'static str,
        request: &Req,
    ) -> Result<Resp, CriError> {
        let transport = move |detail: String| CriError::Transport { method, detail };
        let exchange = async {
            let mut channel = self.channel.clone().ready().await.map_err(|e| transport(e.to_string()))?;
            let head = http::Request::post(format!("http://localhost{method}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .map_err(|e| transport(e.to_string()))?;
            let (response, mut body_out) = channel.send_request(head, false).map_err(|e| transport(e.to_string()))?;
            body_out.send_data(grpc_frame(request), true).map_err(|e| transport(e.to_string()))?;
            let (head, mut body) = response.await.map_err(|e| transport(e.to_string()))?.into_parts();
            let mut received = BytesMut::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.map_err(|e| transport(e.to_string()))?;
                let _ = body.flow_control().release_capacity(chunk.len());
                received.extend_from_slice(&chunk);
            }
            let trailers = body.trailers().await.map_err(|e| transport(e.to_string()))?.unwrap_or_default();
            Ok::<_, CriError>((head, received, trailers))
        };
        let (head, received, trailers) = self
            .runtime
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, exchange).await })
            .map_err(|_| transport(format!("no answer within {CALL_TIMEOUT:?}")))??;
        if head.status != http::StatusCode::OK {
            return Err(transport(format!("HTTP status {}", head.status)));
        }
        let field = |name: &str| trailers.get(name).or_else(|| head.headers.get(name)).and_then(|v| v.to_str().ok());
        let code = field("grpc-status").ok_or_else(|| transport("no grpc-status".into()))?;
        let code: u32 = code.parse().map_err(|_| transport(format!("grpc-status {code:?}")))?;
        if code != 0 {
            return Err(CriError::Status { method, code, message: percent_decode(field("grpc-message").unwrap_or("")) });
        }
        let message = grpc_message(&received).map_err(transport)?;
        Resp::decode(message).map_err(|e| transport(format!("undecodable response: {e}")))
    }
}

/// gRPC's framing: a compression flag (0: none), the length (big endian), the message.
fn grpc_frame(message: &impl prost::Message) -> Bytes {
    let length = message.encoded_len();
    let mut frame = BytesMut::with_capacity(5 + length);
    frame.put_u8(0);
    frame.put_u32(u32::try_from(length).expect("a CRI request under 4 GiB"));
    message.encode(&mut frame).expect("the buffer was sized for the message");
    frame.freeze()
}

/// The one message of a unary response.
fn grpc_message(body: &[u8]) -> Result<&[u8], String> {
    let (&[compressed, length @ ..], message) = body.split_first_chunk::<5>().ok_or("no gRPC message in the response")?;
    let length = u32::from_be_bytes(length) as usize;
    if compressed != 0 {
        return Err("a compressed response, which this client never asked for".into());
    }
    if message.len() != length {
        return Err(format!("the response holds {} bytes after the frame header, which announces {length}", message.len()));
    }
    Ok(message)
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped =
            bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], escaped) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The annotation Istio's injector writes on a pod it gave a sidecar, and its value for a pod
/// on a node with istio-cni (the istio-validation init container, the istio-proxy container):
/// the CNI plugin captures a pod whose status names `istio-proxy`.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
pub const INJECTED_STATUS: &str = r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["workload-socket","credential-socket","workload-certs","istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#;

/// A sandbox configured as a kubelet does for an ordinary pod (its own network and IPC
/// namespaces, a PID namespace per container); add annotations and labels to taste.
pub fn pod_sandbox_config(name: &str, namespace: &str) -> PodSandboxConfig {
    let uid = format!("{namespace}-{name}-{}", crate::unique("uid"));
    let mode = |m: NamespaceMode| m as i32;
    let namespace_options =
        NamespaceOption { network: mode(NamespaceMode::Pod), pid: mode(NamespaceMode::Container), ipc: mode(NamespaceMode::Pod) };
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata { name: name.into(), uid, namespace: namespace.into(), attempt: 0 }),
        hostname: name.into(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext { namespace_options: Some(namespace_options) }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl StatusResponse {
    /// Whether the runtime reports the condition (`RuntimeReady`, `NetworkReady`) true.
    pub fn condition(&self, kind: &str) -> bool {
        self.status.iter().flat_map(|s| &s.conditions).any(|c| c.r#type == kind && c.status)
    }

    /// The network configuration lists containerd has loaded for pods' `eth0`, as their files
    /// read (its `cniconfig`; the loopback network it adds itself is left out).
    pub fn cni_conflists(&self) -> Vec<Value> {
        let Some(Ok(config)) = self.info.get("cniconfig").map(|text| serde_json::from_str::<Value>(text)) else {
            return Vec::new();
        };
        let networks = config["Networks"].as_array().cloned().unwrap_or_default();
        networks
            .iter()
            .filter(|network| network["IFName"] == "eth0")
            .filter_map(|network| serde_json::from_str(network["Config"]["Source"].as_str()?).ok())
            .collect()
    }
}

impl PodSandboxStatusResponse {
    /// The sandbox's network namespace, from containerd's verbose `info` (its OCI spec).
    pub fn netns_path(&self) -> Option<PathBuf> {
        let info: Value = serde_json::from_str(self.info.get("info")?).ok()?;
        let namespaces = info["runtimeSpec"]["linux"]["namespaces"].as_array()?;
        let network = namespaces.iter().find(|ns| ns["type"] == "network")?;
        Some(PathBuf::from(network["path"].as_str()?))
    }

    /// The pod's first IP, as the CNI chain's result gave it.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.status.as_ref()?.network.as_ref()?.ip.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn frames_round_trip_and_bad_frames_are_refused() {
        let request = PodSandboxIdRequest { pod_sandbox_id: "abc".into() };
        let frame = grpc_frame(&request);
        assert_eq!(&frame[..5], &[0, 0, 0, 0, 5]);
        let decoded = PodSandboxIdRequest::decode(grpc_message(&frame).unwrap()).unwrap();
        assert_eq!(decoded, request);
        assert!(grpc_message(&frame[..6]).unwrap_err().contains("announces 5"));
        assert!(grpc_message(&[0, 0]).is_err());
        let mut compressed = frame.to_vec();
        compressed[0] = 1;
        assert!(grpc_message(&compressed).unwrap_err().contains("compressed"));
    }

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(percent_decode("failed%20to%3A x%zz%"), "failed to: x%zz%");
    }
}
