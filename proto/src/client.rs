//! A small mTLS client of the federation service, used by the trainer and by tests.
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::v1::federation_client::FederationClient as RawClient;
use crate::{
    ChunkError, DEFAULT_CHUNK_ELEMS, GetGlobalModelRequest, GetRoundStatusRequest, MAX_MESSAGE_BYTES,
    ModelHeader, RoundStatus, SubmitUpdateResponse, UpdateChunk, UpdateHeader, Vector, VectorAssembler,
    f32_chunks, model_chunk, sha256_f32, update_chunk,
};

/// A client's TLS material, PEM encoded.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The study CA certificate (what the server's certificate must chain to).
    pub ca_pem: String,
    /// This hospital's certificate and key.
    pub cert_pem: String,
    pub key_pem: String,
    /// The name to verify in the server certificate (a DNS SAN such as `localhost`, or an IP SAN).
    pub server_name: String,
}

/// Errors of the federation client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid aggregator address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot connect to the aggregator at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("aggregator refused: {} ({})", .0.message(), code_name(.0.code()))]
    Status(#[from] tonic::Status),
    #[error("global model stream: {0}")]
    Chunk(#[from] ChunkError),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The gRPC status code, when the server answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// Whether retrying later may help (the server is down or restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } => true,
            ClientError::Status(s) => matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            ),
            _ => false,
        }
    }
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

/// The global model of one round, reassembled and checked against its digest.
#[derive(Debug, Clone)]
pub struct GlobalModel {
    pub header: ModelHeader,
    pub params: Vec<f32>,
    /// SCAFFOLD's server control variate.
    pub control: Option<Vec<f32>>,
}

/// The global model of one round of a secure-aggregation study, as served: optional plaintext
/// parameters of round `header.secure_aggregation.base_round` and the encrypted aggregates of the rounds
/// from there to `header.round` (the hospital decrypts and applies them; see `caduceus-trainer`).
#[derive(Debug, Clone)]
pub struct SecureGlobalModel {
    pub header: ModelHeader,
    pub info: crate::SecureAggregation,
    /// Plaintext parameters of the base round (the public initial model), when sent.
    pub base_params: Option<Vec<f32>>,
    /// `(closed round, aggregate chunks in order)`, ascending rounds, contiguous from the base round.
    pub aggregates: Vec<(u32, Vec<Vec<u8>>)>,
}

/// An mTLS client of one study's aggregator.
#[derive(Debug, Clone)]
pub struct FederationClient {
    inner: RawClient<Channel>,
    study_id: String,
    addr: String,
}

impl FederationClient {
    /// Connects to `addr` (`host:port`, or a full `https://` URL) with mutual TLS.
    pub async fn connect(addr: &str, tls: &ClientTls, study_id: &str) -> Result<Self, ClientError> {
        let url = if addr.starts_with("https://") {
            addr.to_string()
        } else if addr.starts_with("http://") {
            return Err(ClientError::Address {
                addr: addr.into(),
                reason: "plaintext http is not allowed; the aggregator speaks mTLS only".into(),
            });
        } else {
            format!("https://{addr}")
        };
        let bad = |reason: String| ClientError::Address {
            addr: addr.into(),
            reason,
        };
        let tls_cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca_pem))
            .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
            .domain_name(tls.server_name.clone());
        let endpoint = Channel::from_shared(url)
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls_cfg)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        let channel = endpoint.connect().await.map_err(|source| ClientError::Connect {
            addr: addr.into(),
            source,
        })?;
        let inner = RawClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            inner,
            study_id: study_id.into(),
            addr: addr.into(),
        })
    }

    /// The address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The study's progress; with `wait_for_round`, a long poll of at most `wait`.
    pub async fn status(
        &mut self,
        wait_for_round: Option<u32>,
        wait: Duration,
    ) -> Result<RoundStatus, ClientError> {
        let req = GetRoundStatusRequest {
            study_id: self.study_id.clone(),
            wait_for_round,
            wait_timeout_ms: wait.as_millis().min(u32::MAX as u128) as u32,
        };
        Ok(self.inner.get_round_status(req).await?.into_inner())
    }

    /// Downloads round `round`'s global model and checks its length and digest.
    pub async fn fetch_model(&mut self, round: u32) -> Result<GlobalModel, ClientError> {
        let req = GetGlobalModelRequest {
            study_id: self.study_id.clone(),
            round,
            have_round: None,
        };
        let mut stream = self.inner.get_global_model(req).await?.into_inner();
        let header = match stream.message().await? {
            Some(crate::ModelChunk {
                kind: Some(model_chunk::Kind::Header(h)),
            }) => h,
            _ => {
                return Err(ClientError::Protocol(
                    "the model stream did not start with a header".into(),
                ));
            }
        };
        if header.secure_aggregation.is_some() {
            return Err(ClientError::Protocol(
                "the aggregator runs secure aggregation (encrypted aggregates): configure \
                 --secure-aggregation tfhe and --study-key"
                    .into(),
            ));
        }
        let n = header.num_parameters;
        let mut params = VectorAssembler::new(Vector::Parameters, n);
        let mut control = header
            .has_control
            .then(|| VectorAssembler::new(Vector::Control, n));
        while let Some(msg) = stream.message().await? {
            let Some(model_chunk::Kind::Data(chunk)) = msg.kind else {
                return Err(ClientError::Protocol(
                    "a second header in the model stream".into(),
                ));
            };
            if chunk.vector == Vector::Control as i32 {
                match control.as_mut() {
                    Some(c) => c.push(&chunk)?,
                    None => {
                        return Err(ClientError::Protocol(
                            "control-variate chunk in a model without one".into(),
                        ));
                    }
                }
            } else {
                params.push(&chunk)?;
            }
        }
        let params = params.finish()?;
        let control = control.map(VectorAssembler::finish).transpose()?;
        let digest = sha256_f32(&params);
        if digest != header.parameters_sha256 {
            return Err(ClientError::Protocol(format!(
                "global model digest mismatch: header says {}, received data hashes to {digest}",
                header.parameters_sha256
            )));
        }
        Ok(GlobalModel {
            header,
            params,
            control,
        })
    }

    /// Downloads round `round`'s model of a secure-aggregation study. With `have_round`, the caller
    /// already holds the decrypted model of that round and only needs the aggregates after it.
    pub async fn fetch_secure_model(
        &mut self,
        round: u32,
        have_round: Option<u32>,
    ) -> Result<SecureGlobalModel, ClientError> {
        let req = GetGlobalModelRequest {
            study_id: self.study_id.clone(),
            round,
            have_round,
        };
        let mut stream = self.inner.get_global_model(req).await?.into_inner();
        let header = match stream.message().await? {
            Some(crate::ModelChunk {
                kind: Some(model_chunk::Kind::Header(h)),
            }) => h,
            _ => {
                return Err(ClientError::Protocol(
                    "the model stream did not start with a header".into(),
                ));
            }
        };
        let info = header.secure_aggregation.clone().ok_or_else(|| {
            ClientError::Protocol(
                "secure aggregation is configured here, but the aggregator serves a plaintext study".into(),
            )
        })?;
        if info.base_round > round {
            return Err(ClientError::Protocol(format!(
                "base round {} is after round {round}",
                info.base_round
            )));
        }
        let n = header.num_parameters;
        let mut params: Option<VectorAssembler> = None;
        let mut aggregates: Vec<(u32, Vec<Vec<u8>>)> = Vec::new();
        while let Some(msg) = stream.message().await? {
            match msg.kind {
                Some(model_chunk::Kind::Data(chunk)) => {
                    if !aggregates.is_empty() {
                        return Err(ClientError::Protocol(
                            "plaintext parameters after the encrypted aggregates".into(),
                        ));
                    }
                    params
                        .get_or_insert_with(|| VectorAssembler::new(Vector::Parameters, n))
                        .push(&chunk)?;
                }
                Some(model_chunk::Kind::EncryptedAggregate(a)) => {
                    let expected_round = info.base_round + aggregates.len() as u32;
                    match aggregates.last_mut() {
                        Some((r, chunks)) if *r == a.round && chunks.len() as u32 == a.chunk_index => {
                            chunks.push(a.data);
                        }
                        _ if a.round == expected_round && a.chunk_index == 0 => {
                            aggregates.push((a.round, vec![a.data]));
                        }
                        _ => {
                            return Err(ClientError::Protocol(format!(
                                "encrypted aggregate chunk {} of round {} out of order",
                                a.chunk_index, a.round
                            )));
                        }
                    }
                }
                _ => {
                    return Err(ClientError::Protocol(
                        "a second header in the model stream".into(),
                    ));
                }
            }
        }
        if info.base_round + aggregates.len() as u32 != round {
            return Err(ClientError::Protocol(format!(
                "expected the encrypted aggregates of rounds {}..{round}, got {}",
                info.base_round,
                aggregates.len()
            )));
        }
        let base_params = params.map(VectorAssembler::finish).transpose()?;
        if let Some(p) = &base_params {
            let digest = sha256_f32(p);
            if digest != header.parameters_sha256 {
                return Err(ClientError::Protocol(format!(
                    "base model digest mismatch: header says {}, received data hashes to {digest}",
                    header.parameters_sha256
                )));
            }
        }
        Ok(SecureGlobalModel {
            header,
            info,
            base_params,
            aggregates,
        })
    }

    /// Sends an encrypted update (secure aggregation): the header, then one data chunk per
    /// caduceus-secagg hospital message. `header.secure_aggregation` is set; the caller sets
    /// `key_fingerprint` and `num_parameters`.
    pub async fn submit_encrypted(
        &mut self,
        mut header: UpdateHeader,
        messages: &[Vec<u8>],
    ) -> Result<SubmitUpdateResponse, ClientError> {
        header.study_id = self.study_id.clone();
        header.secure_aggregation = true;
        header.has_control = false;
        let mut msgs = Vec::with_capacity(1 + messages.len());
        msgs.push(UpdateChunk {
            kind: Some(update_chunk::Kind::Header(header)),
        });
        let mut offset = 0u64;
        for m in messages {
            msgs.push(UpdateChunk {
                kind: Some(update_chunk::Kind::Data(crate::DataChunk {
                    vector: Vector::Parameters as i32,
                    offset,
                    payload: Some(crate::data_chunk::Payload::Encrypted(bytes::Bytes::from(
                        m.clone(),
                    ))),
                })),
            });
            offset += m.len() as u64;
        }
        Ok(self
            .inner
            .submit_update(futures::stream::iter(msgs))
            .await?
            .into_inner())
    }

    /// Sends an update: the header, then the parameter delta and (SCAFFOLD) the control delta in
    /// chunks. `header.num_parameters` and `header.has_control` are filled in from the vectors.
    pub async fn submit(
        &mut self,
        mut header: UpdateHeader,
        params: Option<&[f32]>,
        control: Option<&[f32]>,
    ) -> Result<SubmitUpdateResponse, ClientError> {
        header.study_id = self.study_id.clone();
        header.num_parameters = params.map_or(0, |p| p.len() as u64);
        header.has_control = control.is_some();
        let mut msgs = Vec::with_capacity(
            1 + params.map_or(0, |p| p.len() / DEFAULT_CHUNK_ELEMS + 1)
                + control.map_or(0, |c| c.len() / DEFAULT_CHUNK_ELEMS + 1),
        );
        msgs.push(UpdateChunk {
            kind: Some(update_chunk::Kind::Header(header)),
        });
        for (vector, values) in [(Vector::Parameters, params), (Vector::Control, control)] {
            if let Some(values) = values {
                msgs.extend(
                    f32_chunks(vector, values, DEFAULT_CHUNK_ELEMS).map(|c| UpdateChunk {
                        kind: Some(update_chunk::Kind::Data(c)),
                    }),
                );
            }
        }
        Ok(self
            .inner
            .submit_update(futures::stream::iter(msgs))
            .await?
            .into_inner())
    }

    /// Sends an arbitrary sequence of update messages (for tests of the server's checks).
    pub async fn submit_raw(&mut self, msgs: Vec<UpdateChunk>) -> Result<SubmitUpdateResponse, ClientError> {
        Ok(self
            .inner
            .submit_update(futures::stream::iter(msgs))
            .await?
            .into_inner())
    }

    /// Sends update messages as `stream` yields them: endless, slow or stalled (for tests of the
    /// server's limits).
    pub async fn submit_stream<S>(&mut self, stream: S) -> Result<SubmitUpdateResponse, ClientError>
    where
        S: futures::Stream<Item = UpdateChunk> + Send + 'static,
    {
        Ok(self.inner.submit_update(stream).await?.into_inner())
    }
}
