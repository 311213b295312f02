//! The Kafka sink over librdkafka (`rdkafka`): an idempotent `FutureProducer`, deliveries
//! awaited at the batch's commit.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use relay_proto::cdc::{Event, Relations};

use super::super::{BatchInfo, BatchLimits, Durability, Flow, Position, Sink, SinkError, Split};
use super::{topic, KafkaConfig};

struct Ready {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
}

/// The Kafka sink.
pub struct KafkaSink {
    cfg: KafkaConfig,
    ready: Option<Ready>,
    /// Topics known to exist, with their partition counts.
    topics: HashMap<String, i32>,
    /// The topic of each relation seen (relation, schema, table → topic).
    topic_of: HashMap<u32, (String, String, std::sync::Arc<str>)>,
    deliveries: Vec<(Position, DeliveryFuture)>,
    commit: Option<super::super::message::Commit>,
    bytes: usize,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("name", &self.cfg.name)
            .field("brokers", &self.cfg.brokers)
            .finish()
    }
}

fn kafka_err(seq: u64, what: &str, e: &KafkaError) -> SinkError {
    let reason = match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => "auth",
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidRecord) => {
            return SinkError {
                rejected: true,
                ..SinkError::new("rejected", seq, format!("Kafka: {what}: {e}"))
            }
        }
        Some(RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::RequestTimedOut) => "timeout",
        _ => "kafka",
    };
    SinkError::new(reason, seq, format!("Kafka: {what}: {e}"))
}

impl KafkaSink {
    /// A sink that connects on the runner's first session.
    pub fn new(cfg: KafkaConfig) -> KafkaSink {
        KafkaSink {
            cfg,
            ready: None,
            topics: HashMap::new(),
            topic_of: HashMap::new(),
            deliveries: Vec::new(),
            commit: None,
            bytes: 0,
        }
    }

    fn client_config(&self) -> Result<ClientConfig, SinkError> {
        let mut c = ClientConfig::new();
        for (k, v) in &self.cfg.properties {
            c.set(k, v);
        }
        c.set("bootstrap.servers", self.cfg.brokers.join(","))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set(
                "message.timeout.ms",
                self.cfg.timeout.as_millis().max(1).to_string(),
            )
            .set("client.id", format!("routy-{}", self.cfg.name))
            // Topics are made by the sink (create_topics) with the partitions it was
            // given, not by a broker's defaults as a side effect of asking for metadata.
            .set("allow.auto.create.topics", "false");
        if !self.cfg.properties.iter().any(|(k, _)| k == "linger.ms") {
            c.set("linger.ms", "5");
        }
        let protocol = match (&self.cfg.tls, &self.cfg.sasl) {
            (None, None) => "plaintext",
            (Some(_), None) => "ssl",
            (None, Some(_)) => "sasl_plaintext",
            (Some(_), Some(_)) => "sasl_ssl",
        };
        c.set("security.protocol", protocol);
        if let Some(t) = &self.cfg.tls {
            if let Some(ca) = &t.ca {
                c.set("ssl.ca.location", ca.display().to_string());
            }
            if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
                c.set("ssl.certificate.location", cert.display().to_string())
                    .set("ssl.key.location", key.display().to_string());
            }
        }
        if let Some(s) = &self.cfg.sasl {
            let pw = super::super::webhook::read_secret(&s.password_file)?;
            c.set("sasl.mechanisms", &s.mechanism)
                .set("sasl.username", &s.username)
                .set("sasl.password", pw);
        }
        Ok(c)
    }

    async fn setup(&self) -> Result<Ready, SinkError> {
        let c = self.client_config()?;
        let producer: FutureProducer = c
            .create()
            .map_err(|e| SinkError::new("config", 0, format!("Kafka producer: {e}")))?;
        let admin: AdminClient<DefaultClientContext> = c
            .create()
            .map_err(|e| SinkError::new("config", 0, format!("Kafka admin client: {e}")))?;
        // Reach the cluster now, so a wrong address is an error of the connect.
        let p = producer.clone();
        let timeout = self.cfg.timeout;
        tokio::task::spawn_blocking(move || p.client().fetch_metadata(None, timeout))
            .await
            .map_err(|e| SinkError::new("connection", 0, e.to_string()))?
            .map_err(|e| {
                SinkError::new(
                    "connection",
                    0,
                    format!("Kafka {}: {e}", self.cfg.brokers.join(",")),
                )
            })?;
        Ok(Ready { producer, admin })
    }

    fn ready(&self, seq: u64) -> Result<&Ready, SinkError> {
        self.ready
            .as_ref()
            .ok_or_else(|| SinkError::new("connection", seq, "Kafka: not connected"))
    }

    /// The partition count of `name`, creating the topic when it is missing.
    async fn ensure_topic(&mut self, seq: u64, name: &str) -> Result<i32, SinkError> {
        if let Some(&n) = self.topics.get(name) {
            return Ok(n);
        }
        let timeout = self.cfg.timeout;
        let partitions = |r: &Ready| {
            let p = r.producer.clone();
            let t = name.to_string();
            tokio::task::spawn_blocking(move || {
                p.client().fetch_metadata(Some(&t), timeout).map(|m| {
                    m.topics()
                        .first()
                        .map_or(0, |t| t.partitions().len() as i32)
                })
            })
        };
        let ready = self.ready(seq)?;
        let mut n = partitions(ready)
            .await
            .map_err(|e| SinkError::new("kafka", seq, e.to_string()))?
            .map_err(|e| kafka_err(seq, &format!("metadata of topic {name}"), &e))?;
        if n == 0 {
            if !self.cfg.create_topics {
                return Err(SinkError::new(
                    "config",
                    seq,
                    format!("Kafka topic {name} does not exist (create_topics is off)"),
                ));
            }
            let topic = NewTopic::new(name, self.cfg.partitions, TopicReplication::Fixed(-1));
            let opts = AdminOptions::new().operation_timeout(Some(timeout));
            let res = ready
                .admin
                .create_topics([&topic], &opts)
                .await
                .map_err(|e| kafka_err(seq, &format!("creating topic {name}"), &e))?;
            for r in res {
                match r {
                    Ok(_) => {
                        tracing::info!(sink = %self.cfg.name, topic = %name, partitions = self.cfg.partitions, "created the Kafka topic")
                    }
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((t, code)) => {
                        return Err(SinkError::new(
                            "kafka",
                            seq,
                            format!("Kafka: creating topic {t}: {code}"),
                        ))
                    }
                }
            }
            // The new topic's partitions, once the metadata knows them.
            let deadline = std::time::Instant::now() + timeout;
            while n == 0 && std::time::Instant::now() < deadline {
                n = partitions(ready)
                    .await
                    .map_err(|e| SinkError::new("kafka", seq, e.to_string()))?
                    .unwrap_or(0);
                if n == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            if n == 0 {
                return Err(SinkError::new(
                    "kafka",
                    seq,
                    format!("Kafka: topic {name} has no partitions after its creation"),
                ));
            }
        }
        self.topics.insert(name.to_string(), n);
        Ok(n)
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &mut self,
        at: Position,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        op: &str,
        body: &[u8],
    ) -> Result<(), Flow> {
        let position = at.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "routy-source",
                value: Some(self.cfg.source.as_bytes()),
            })
            .insert(Header {
                key: "routy-position",
                value: Some(position.as_bytes()),
            })
            .insert(Header {
                key: "routy-op",
                value: Some(op.as_bytes()),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).payload(body).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        self.bytes += body.len();
        loop {
            let producer = &self.ready(at.seq)?.producer;
            match producer.send_result(record) {
                Ok(d) => {
                    self.deliveries.push((at, d));
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // The local queue is full: wait for the oldest delivery, then again.
                    record = r;
                    if self.deliveries.is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    } else {
                        let (at, d) = self.deliveries.remove(0);
                        Self::delivered(at, d).await?;
                    }
                }
                Err((e, _)) => {
                    return Err(kafka_err(at.seq, &format!("producing {at} to {topic}"), &e).into())
                }
            }
        }
    }

    async fn delivered(at: Position, d: DeliveryFuture) -> Result<(), Flow> {
        match d.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, m))) => {
                use rdkafka::Message;
                let what = format!("delivering {at} to {}", m.topic());
                Err(kafka_err(at.seq, &what, &e).into())
            }
            Err(_) => Err(SinkError::new(
                "kafka",
                at.seq,
                format!("Kafka: the delivery of {at} was dropped"),
            )
            .into()),
        }
    }

    fn clear(&mut self) {
        self.deliveries.clear();
        self.commit = None;
        self.bytes = 0;
    }
}

impl Sink for KafkaSink {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn durability(&self) -> Durability {
        Durability::AtLeastOnce
    }

    fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_records: usize::MAX,
            max_events: self.cfg.max_messages,
            max_bytes: 64 << 20,
            max_delay: self.cfg.max_delay,
            split: Split::FromBegin,
        }
    }

    async fn connect(&mut self) -> Result<Option<Position>, Flow> {
        self.clear();
        if self.ready.is_none() {
            self.topics.clear();
            self.ready = Some(self.setup().await?);
        }
        Ok(None)
    }

    async fn begin(&mut self, _from: Position) -> Result<(), Flow> {
        self.clear();
        Ok(())
    }

    async fn write(&mut self, at: Position, ev: Event, rels: &Relations) -> Result<(), Flow> {
        match &ev {
            Event::Begin {
                commit_lsn,
                commit_time,
                ..
            } => {
                self.commit = Some(super::super::message::Commit::new(
                    *commit_lsn,
                    *commit_time,
                ));
                return Ok(());
            }
            Event::Commit { .. } => {
                self.commit = None;
                return Ok(());
            }
            _ => {}
        }
        let ids = super::super::message::tables_of(&ev);
        if ids.is_empty() {
            return Ok(());
        }
        let single = ids.len() == 1;
        let mut body = Vec::with_capacity(256);
        if single {
            super::super::message::write_change(&mut body, at, &ev, rels, self.commit.as_ref());
        }
        let mut key = Vec::with_capacity(32);
        for id in &ids {
            let rel = rels.get(*id).ok_or_else(|| {
                SinkError::new(
                    "schema",
                    at.seq,
                    format!("a change of relation {id}, whose schema was not seen"),
                )
            })?;
            let name = match self.topic_of.get(id) {
                Some((s, t, name)) if *s == rel.schema && *t == rel.name => name.clone(),
                _ => {
                    let name: std::sync::Arc<str> =
                        topic(&self.cfg.topic_prefix, &rel.schema, &rel.name).into();
                    self.topic_of
                        .insert(*id, (rel.schema.clone(), rel.name.clone(), name.clone()));
                    name
                }
            };
            let partitions = self.ensure_topic(at.seq, &name).await?;
            key.clear();
            match &ev {
                Event::Insert { new, .. } | Event::Update { new, .. } => {
                    super::super::message::write_key(&mut key, rel, new)
                }
                Event::Delete { old, .. } => {
                    super::super::message::write_key(&mut key, rel, &old.values)
                }
                _ => {}
            }
            if !single {
                body =
                    super::super::message::table_change(at, &ev, rels, self.commit.as_ref(), rel);
            }
            if !key.is_empty() {
                self.send(at, &name, None, Some(&key), ev.kind(), &body)
                    .await?;
            } else {
                // Not about one row (TRUNCATE, a snapshot's start and end): to every
                // partition, in order with the rows of each.
                for p in 0..partitions {
                    self.send(at, &name, Some(p), None, ev.kind(), &body)
                        .await?;
                }
            }
        }
        Ok(())
    }

    fn pending_bytes(&self) -> usize {
        self.bytes
    }

    async fn commit(&mut self, _batch: &BatchInfo) -> Result<(), Flow> {
        for (at, d) in std::mem::take(&mut self.deliveries) {
            Self::delivered(at, d).await?;
        }
        self.clear();
        Ok(())
    }

    async fn abort(&mut self) {
        self.clear();
    }

    async fn fail(&mut self, e: SinkError) -> SinkError {
        self.clear();
        // A new producer (and producer id) on the next session.
        self.ready = None;
        e
    }
}
