//! Read-only D-Bus gateway: mirrors chosen publications as D-Bus objects so that
//! `busctl` and `gdbus` on the device can read them. The Unix-socket bus stays the primary path;
//! nothing here can write into a topic.
//!
//! Each key of a mirrored publication is one object at
//! `/org/cairn/<publisher>/<Topic>/<key>`, each element escaped by [`escape_path_element`], with
//! the interface `org.cairn.Topic1` and its read-only properties `Publisher`, `Topic`, `Key`,
//! `Json` (the value as the read-outs print it: `Topic::readout_json`, states by name) and `Fields` (`a{ss}`: every top-level string, number or boolean of
//! that JSON, as text). A change of value emits `PropertiesChanged`; objects come and go with
//! `InterfacesAdded`/`InterfacesRemoved` of the `ObjectManager` at `/org/cairn`.
//!
//! The workspace builds zbus without its `service` feature, so there is no `ObjectServer`: this
//! module answers the standard interfaces (Properties, Introspectable, Peer, ObjectManager) itself,
//! from one table. That also makes it read-only by construction: `Properties.Set` always fails.
//!
//! Tenants: a gateway can serve one tenant's view of a topic
//! ([`Gateway::mirror_tenant`]: the keys whose value belongs to that tenant, and device-wide
//! ones) under that tenant's own bus name, [`tenant_bus_name`] (`org.cairn.Tenant.<tenant>`). Who
//! may talk to which name is then the D-Bus daemon's policy, as for any system service:
//! [`tenant_policy`] writes the `<busconfig>` for `/etc/dbus-1/system.d/` that lets only the
//! members of a tenant's group call that tenant's gateway and receive its signals, and lets the
//! general technicians' group reach every gateway. The gateway itself checks no credentials:
//! the daemon does, on every message (method calls by `send_destination`, which also matches a
//! gateway addressed by its unique name; broadcast signals by `receive_sender`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Bound;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cairn_types::Topic;
use futures_core::Stream;
use tokio::task::JoinHandle;
use zbus::message::{Flags, Header, Type as MessageType};
use zbus::{Connection, MatchRule, Message, MessageStream, ObjectPath, OwnedVariant, Variant, fdo};

use cairn_pubsub::{Event, Subscription};

/// Where the gateway's objects live, and where its `ObjectManager` is served.
pub const ROOT_PATH: &str = "/org/cairn";
/// The gateway's bus name for the whole device.
pub const BUS_NAME: &str = "org.cairn.Bus";
/// Tenant gateways own `org.cairn.Tenant.<tenant>` ([`tenant_bus_name`]).
pub const TENANT_NAME_PREFIX: &str = "org.cairn.Tenant";
/// The interface of every mirrored key.
pub const INTERFACE: &str = "org.cairn.Topic1";

const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";
const PEER: &str = "org.freedesktop.DBus.Peer";
const OBJECT_MANAGER: &str = "org.freedesktop.DBus.ObjectManager";
/// Interfaces of a mirrored key, as listed in `InterfacesAdded`/`InterfacesRemoved`.
const OBJECT_INTERFACES: [&str; 4] = [INTERFACE, PROPERTIES, INTROSPECTABLE, PEER];

/// Connecting and taking the name must not hang the agent on a stuck bus.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Method calls waiting for the gateway; beyond it zbus stops reading the socket.
const CALL_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("D-Bus gateway: cannot connect to the bus at {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: zbus::Error,
    },
    #[error(
        "D-Bus gateway: cannot own {name} on the bus at {address}: {source}; \
         is another gateway running?"
    )]
    RequestName {
        name: String,
        address: String,
        #[source]
        source: zbus::Error,
    },
    #[error(
        "D-Bus gateway: no answer from the bus at {address} within {SETUP_TIMEOUT:?} while {what}"
    )]
    Timeout { address: String, what: &'static str },
    #[error("D-Bus gateway already mirrors {publisher}/{topic}: mirror each publication once")]
    AlreadyMirrored { publisher: String, topic: String },
}

/// A connection to a D-Bus bus that owns `bus_name` and serves the mirrored publications.
/// Dropping it stops the mirrors and closes the connection, which releases the name.
pub struct Gateway {
    conn: Connection,
    objects: Arc<Mutex<Objects>>,
    mirrored: HashSet<(String, &'static str)>,
    tasks: Vec<JoinHandle<()>>,
    /// Turns true when the connection to the bus is gone (the daemon stopped or restarted).
    closed: tokio::sync::watch::Receiver<bool>,
}

impl Gateway {
    /// Connects to the bus at `address` (a D-Bus address such as `unix:path=/run/dbus/...`) and
    /// requests `bus_name` (e.g. `org.cairn.Bus`), failing if another connection owns it.
    pub async fn connect(address: &str, bus_name: &str) -> Result<Self, GatewayError> {
        let timeout = |what| GatewayError::Timeout {
            address: address.to_string(),
            what,
        };
        let connect_error = |source| GatewayError::Connect {
            address: address.to_string(),
            source,
        };
        let conn = tokio::time::timeout(
            SETUP_TIMEOUT,
            zbus::connection::Builder::address(address).build(),
        )
        .await
        .map_err(|_| timeout("connecting"))?
        .map_err(connect_error)?;

        // Listen before owning the name, so that no early call goes unanswered. A rule for
        // method calls is only a local filter: nothing is registered with the bus.
        let rule = MatchRule::builder()
            .msg_type(MessageType::MethodCall)
            .build()
            .map_err(connect_error)?;
        let calls =
            MessageStream::for_match_rule(rule, &conn, std::num::NonZeroUsize::new(CALL_QUEUE))
                .await
                .map_err(connect_error)?;
        let machine_id = machine_id().await;
        let objects = Arc::new(Mutex::new(Objects {
            by_path: BTreeMap::new(),
            machine_id,
        }));
        let (gone, closed) = tokio::sync::watch::channel(false);
        let conn_for_server = conn.clone();
        let objects_for_server = objects.clone();
        let server = tokio::spawn(async move {
            serve_calls(conn_for_server, calls, objects_for_server).await;
            let _ = gone.send(true);
        });
        // From here on, dropping `gateway` on an error also stops the server.
        let gateway = Self {
            conn,
            objects,
            mirrored: HashSet::new(),
            tasks: vec![server],
            closed,
        };

        // Exclusively: zbus's `request_name` would let a later connection take the name over.
        let flags = fdo::RequestNameFlags::DO_NOT_QUEUE;
        let request = gateway.conn.request_name_with_flags(bus_name, flags);
        tokio::time::timeout(SETUP_TIMEOUT, request)
            .await
            .map_err(|_| timeout("requesting the name"))?
            .map_err(|source| GatewayError::RequestName {
                name: bus_name.to_string(),
                address: address.to_string(),
                source,
            })?;
        tracing::info!(%address, name = bus_name, "D-Bus gateway serving {ROOT_PATH}");
        Ok(gateway)
    }

    /// Mirrors every key of `sub` as an object until the gateway is dropped.
    pub fn mirror<T: Topic>(&mut self, sub: Subscription<T>) -> Result<(), GatewayError> {
        self.spawn_mirror(sub, None)
    }

    /// Mirrors the keys of `sub` whose value belongs to `tenant` (`""`: the default tenant),
    /// and its device-wide keys (`Topic::tenant() == None`); a value that moves to another
    /// tenant leaves the tree. Meant for a gateway that owns [`tenant_bus_name`]`(tenant)`.
    pub fn mirror_tenant<T: Topic>(
        &mut self,
        sub: Subscription<T>,
        tenant: &str,
    ) -> Result<(), GatewayError> {
        self.spawn_mirror(sub, Some(tenant.to_string()))
    }

    /// Mirrors `sub`, all of it or (`tenant`) that tenant's view, until the gateway is dropped.
    fn spawn_mirror<T: Topic>(
        &mut self,
        sub: Subscription<T>,
        tenant: Option<String>,
    ) -> Result<(), GatewayError> {
        let publisher = sub.publisher().to_string();
        if !self.mirrored.insert((publisher.clone(), T::NAME)) {
            return Err(GatewayError::AlreadyMirrored {
                publisher,
                topic: T::NAME.to_string(),
            });
        }
        let mirror = Mirror {
            conn: self.conn.clone(),
            objects: self.objects.clone(),
            publisher,
            topic: T::NAME,
            tenant,
        };
        self.tasks.push(tokio::spawn(mirror.run(sub)));
        Ok(())
    }

    /// Resolves once the connection to the bus is gone (the daemon stopped or restarted): the
    /// objects are unreachable and the name is lost; connect a new gateway to serve again.
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|gone| *gone).await;
    }

    /// How many keys are currently exposed, over all mirrored publications.
    pub fn object_count(&self) -> usize {
        lock(&self.objects).by_path.len()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// For `Peer.GetMachineId`: where systemd, then D-Bus, keep it.
async fn machine_id() -> Option<String> {
    for file in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        if let Ok(id) = tokio::fs::read_to_string(file).await
            && !id.trim().is_empty()
        {
            return Some(id.trim().to_string());
        }
    }
    None
}

/// The bus name of `tenant`'s gateway: `org.cairn.Tenant.<tenant>`, the tenant escaped as an
/// object-path element ([`escape_path_element`]; `-` is `_2D`, the default tenant `""` is `_`),
/// with a `_` in front if it starts with a digit (a bus name element must not). Tenant names
/// as the config-agent accepts them (`[a-z0-9][a-z0-9_-]{0,62}`) map one to one.
pub fn tenant_bus_name(tenant: &str) -> String {
    let element = escape_path_element(tenant);
    let lead = if element.starts_with(|c: char| c.is_ascii_digit()) {
        "_"
    } else {
        ""
    };
    format!("{TENANT_NAME_PREFIX}.{lead}{element}")
}

/// A D-Bus daemon policy (`<busconfig>`, for `/etc/dbus-1/system.d/cairn-gateway.conf`) for the
/// gateways: root owns [`BUS_NAME`] and the tenant names; members of `general_group` (the
/// technicians, if any) reach every gateway; members of each `(tenant, group)` reach that
/// tenant's gateway only; everyone else none. Groups are names or numeric gids (the daemon
/// resolves either through the group database, so the group must exist there).
///
/// Method calls are gated by `send_destination` (which the daemon matches against every name
/// the destination owns, so the unique name `:1.42` of a gateway is covered too), signals by
/// `receive_sender`; replies to calls a peer was allowed to make stay allowed.
pub fn tenant_policy(general_group: Option<&str>, tenants: &[(&str, &str)]) -> String {
    let names: Vec<String> = std::iter::once(BUS_NAME.to_string())
        .chain(tenants.iter().map(|(tenant, _)| tenant_bus_name(tenant)))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let allow = |name: &str| {
        format!(
            "    <allow send_destination=\"{name}\"/>\n    <allow receive_sender=\"{name}\"/>\n"
        )
    };
    let mut xml = String::from(
        "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n          \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n\
         <!-- Cairn's read-only D-Bus gateways: who may read which tenant's apps. Generated by\n              cairn_dbus::tenant_policy. -->\n<busconfig>\n",
    );
    xml.push_str("  <policy user=\"root\">\n");
    xml.push_str(&format!("    <allow own=\"{BUS_NAME}\"/>\n"));
    xml.push_str(&format!(
        "    <allow own_prefix=\"{TENANT_NAME_PREFIX}\"/>\n"
    ));
    for name in &names {
        xml.push_str(&allow(name));
    }
    xml.push_str("  </policy>\n  <policy context=\"default\">\n");
    for name in &names {
        xml.push_str(&format!(
            "    <deny send_destination=\"{name}\"/>\n    <deny receive_sender=\"{name}\"/>\n"
        ));
    }
    xml.push_str("  </policy>\n");
    if let Some(group) = general_group {
        xml.push_str(&format!("  <policy group=\"{}\">\n", xml_escape(group)));
        for name in &names {
            xml.push_str(&allow(name));
        }
        xml.push_str("  </policy>\n");
    }
    for (tenant, group) in tenants {
        xml.push_str(&format!("  <policy group=\"{}\">\n", xml_escape(group)));
        xml.push_str(&allow(&tenant_bus_name(tenant)));
        xml.push_str("  </policy>\n");
    }
    xml.push_str("</busconfig>\n");
    xml
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `/org/cairn/<publisher>/<topic>/<key>`, each element escaped by [`escape_path_element`].
pub fn object_path(publisher: &str, topic: &str, key: &str) -> String {
    format!(
        "{ROOT_PATH}/{}/{}/{}",
        escape_path_element(publisher),
        escape_path_element(topic),
        escape_path_element(key)
    )
}

/// The `(publisher, topic, key)` an [`object_path`] was made of, if it is one.
pub fn parse_object_path(path: &str) -> Option<(String, String, String)> {
    let rest = path.strip_prefix(ROOT_PATH)?.strip_prefix('/')?;
    let mut elements = rest.split('/').map(unescape_path_element);
    let parsed = (elements.next()??, elements.next()??, elements.next()??);
    elements.next().is_none().then_some(parsed)
}

/// Object-path elements allow only `[A-Za-z0-9_]`: letters and digits stay, every other byte
/// (`_` included) becomes `_XX` with two upper-case hex digits, and the empty string is `_`.
/// Every output is a valid, non-empty element and [`unescape_path_element`] reverses it.
pub fn escape_path_element(text: &str) -> String {
    if text.is_empty() {
        return "_".to_string();
    }
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() {
            out.push(byte as char);
        } else {
            out.push_str(&format!("_{byte:02X}"));
        }
    }
    out
}

/// The text [`escape_path_element`] turned into `element`; `None` for anything it cannot produce.
pub fn unescape_path_element(element: &str) -> Option<String> {
    if element == "_" {
        return Some(String::new());
    }
    let hex = |digit: u8| match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    };
    let mut bytes = Vec::with_capacity(element.len());
    let mut input = element.bytes();
    while let Some(byte) = input.next() {
        match byte {
            b'_' => {
                let high = hex(input.next()?)?;
                let low = hex(input.next()?)?;
                let decoded = (high << 4) | low;
                // Letters and digits are never escaped, so `_41` is not a canonical element.
                if decoded.is_ascii_alphanumeric() {
                    return None;
                }
                bytes.push(decoded);
            }
            _ if byte.is_ascii_alphanumeric() => bytes.push(byte),
            _ => return None,
        }
    }
    if bytes.is_empty() {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// The top-level strings, numbers and booleans of a JSON object, as text; nothing for other values.
fn scalar_fields(json: &serde_json::Value) -> BTreeMap<String, String> {
    let Some(object) = json.as_object() else {
        return BTreeMap::new();
    };
    object
        .iter()
        .filter_map(|(name, value)| {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => return None,
            };
            Some((name.clone(), text))
        })
        .collect()
}

fn lock(objects: &Mutex<Objects>) -> MutexGuard<'_, Objects> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    objects
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Everything the gateway exposes. Guarded by a std mutex that is never held across an await:
/// replies and signals are built under it and sent after.
struct Objects {
    /// Keyed by object path; every key is a valid path below [`ROOT_PATH`].
    by_path: BTreeMap<String, TopicObject>,
    machine_id: Option<String>,
}

/// One key of one publication.
struct TopicObject {
    publisher: String,
    topic: &'static str,
    key: String,
    json: String,
    fields: BTreeMap<String, String>,
}

impl TopicObject {
    fn property(&self, name: &str) -> Option<Variant<'_>> {
        Some(match name {
            "Publisher" => Variant::from(self.publisher.as_str()),
            "Topic" => Variant::from(self.topic),
            "Key" => Variant::from(self.key.as_str()),
            "Json" => Variant::from(self.json.as_str()),
            "Fields" => self.fields_variant(),
            _ => return None,
        })
    }

    fn fields_variant(&self) -> Variant<'_> {
        Variant::from(
            self.fields
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect::<BTreeMap<&str, &str>>(),
        )
    }

    fn properties(&self) -> BTreeMap<&'static str, Variant<'_>> {
        ["Publisher", "Topic", "Key", "Json", "Fields"]
            .into_iter()
            .filter_map(|name| Some((name, self.property(name)?)))
            .collect()
    }

    /// What `GetManagedObjects` and `InterfacesAdded` list for this object.
    fn interfaces(&self) -> BTreeMap<&'static str, BTreeMap<&'static str, Variant<'_>>> {
        OBJECT_INTERFACES
            .into_iter()
            .map(|interface| {
                let properties = if interface == INTERFACE {
                    self.properties()
                } else {
                    BTreeMap::new()
                };
                (interface, properties)
            })
            .collect()
    }
}

/// A built reply, or the D-Bus error to answer with.
type CallResult = Result<Message, fdo::Error>;

impl Objects {
    fn topic_object(&self, path: &str) -> Result<&TopicObject, fdo::Error> {
        match self.by_path.get(path) {
            Some(object) => Ok(object),
            None if self.is_node(path) => Err(fdo::Error::UnknownInterface(format!(
                "{path} has no properties: it only groups objects"
            ))),
            None => Err(unknown_object(path)),
        }
    }

    /// The names of the nodes directly below `path`.
    fn children(&self, path: &str) -> BTreeSet<&str> {
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        let below = self
            .by_path
            .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
            .map(|(full, _)| full.as_str())
            .take_while(|full| full.starts_with(&prefix))
            .chain(std::iter::once(ROOT_PATH).filter(|root| root.starts_with(&prefix)));
        below
            .filter_map(|full| full[prefix.len()..].split('/').next())
            .filter(|child| !child.is_empty())
            .collect()
    }

    /// Whether `path` is a node of the tree: the root, an object, or an ancestor of one.
    fn is_node(&self, path: &str) -> bool {
        path == "/"
            || path == ROOT_PATH
            || self.by_path.contains_key(path)
            || !self.children(path).is_empty()
    }

    fn introspect(&self, path: &str) -> Option<String> {
        if !self.is_node(path) {
            return None;
        }
        let mut xml = String::from(
            "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \
             \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
        );
        xml.push_str(PEER_XML);
        xml.push_str(INTROSPECTABLE_XML);
        if self.by_path.contains_key(path) {
            xml.push_str(PROPERTIES_XML);
            xml.push_str(TOPIC_XML);
        }
        if path == ROOT_PATH {
            xml.push_str(OBJECT_MANAGER_XML);
        }
        for child in self.children(path) {
            // Children are path elements, `[A-Za-z0-9_]`: nothing to escape in XML.
            xml.push_str(&format!("  <node name=\"{child}\"/>\n"));
        }
        xml.push_str("</node>\n");
        Some(xml)
    }

    /// The reply to a method call: a return, or the D-Bus error to send back.
    fn answer(&self, call: &Message, header: &Header<'_>) -> CallResult {
        let path = header.path().map_or("/", |p| p.as_str());
        let member = header.member().map_or("", |m| m.as_str());
        // The interface is optional in a call; our method names are unique across interfaces.
        let interface = header
            .interface()
            .map(|i| i.as_str())
            .unwrap_or(match member {
                "Get" | "GetAll" | "Set" => PROPERTIES,
                "Introspect" => INTROSPECTABLE,
                "Ping" | "GetMachineId" => PEER,
                "GetManagedObjects" => OBJECT_MANAGER,
                _ => "",
            });
        let body = call.body();
        let invalid_args =
            |e: zbus::Error| fdo::Error::InvalidArgs(format!("{interface}.{member}: {e}"));
        match (interface, member) {
            (PEER, "Ping") => reply(header, &()),
            (PEER, "GetMachineId") => match &self.machine_id {
                Some(id) => reply(header, &id.as_str()),
                None => Err(fdo::Error::Failed(
                    "this device has no machine id in /etc/machine-id".into(),
                )),
            },
            (INTROSPECTABLE, "Introspect") => {
                let xml = self.introspect(path).ok_or_else(|| unknown_object(path))?;
                reply(header, &xml)
            }
            (PROPERTIES, "Get") => {
                let (wanted, name): (String, String) = body.deserialize().map_err(invalid_args)?;
                let object = self.topic_object(path)?;
                check_interface(&wanted, path)?;
                let value = object
                    .property(&name)
                    .ok_or_else(|| unknown_property(&name))?;
                reply(header, &value)
            }
            (PROPERTIES, "GetAll") => {
                let (wanted,): (String,) = body.deserialize().map_err(invalid_args)?;
                let object = self.topic_object(path)?;
                check_interface(&wanted, path)?;
                reply(header, &object.properties())
            }
            (PROPERTIES, "Set") => {
                let (wanted, name, _value): (String, String, OwnedVariant) =
                    body.deserialize().map_err(invalid_args)?;
                let object = self.topic_object(path)?;
                check_interface(&wanted, path)?;
                match object.property(&name) {
                    Some(_) => Err(fdo::Error::PropertyReadOnly(format!(
                        "{name} is read-only: the D-Bus gateway only mirrors the bus; \
                         publish a new value on the Cairn bus instead"
                    ))),
                    None => Err(unknown_property(&name)),
                }
            }
            (OBJECT_MANAGER, "GetManagedObjects") if path == ROOT_PATH => {
                let managed: BTreeMap<ObjectPath<'_>, _> = self
                    .by_path
                    .iter()
                    .map(|(path, object)| {
                        (ObjectPath::from_str_unchecked(path), object.interfaces())
                    })
                    .collect();
                reply(header, &managed)
            }
            _ if !self.is_node(path) => Err(unknown_object(path)),
            _ => Err(fdo::Error::UnknownMethod(format!(
                "{path} has no method {interface}.{member}"
            ))),
        }
    }
}

fn reply<B>(header: &Header<'_>, body: &B) -> CallResult
where
    B: serde::Serialize + zbus::DynamicType,
{
    Message::method_return(header)
        .build(body)
        .map_err(fdo::Error::from)
}

fn check_interface(wanted: &str, path: &str) -> Result<(), fdo::Error> {
    if wanted.is_empty() || wanted == INTERFACE {
        Ok(())
    } else {
        Err(fdo::Error::UnknownInterface(format!(
            "{path} has no properties on {wanted}, only on {INTERFACE}"
        )))
    }
}

fn unknown_object(path: &str) -> fdo::Error {
    fdo::Error::UnknownObject(format!("no object at {path}"))
}

fn unknown_property(name: &str) -> fdo::Error {
    fdo::Error::UnknownProperty(format!(
        "{INTERFACE} has no property {name}; it has Publisher, Topic, Key, Json and Fields"
    ))
}

/// The next message of `stream`; `None` once the connection is closed.
async fn next_message(stream: &mut MessageStream) -> Option<zbus::Result<Message>> {
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// Answers every method call addressed to the gateway until the connection closes.
async fn serve_calls(conn: Connection, mut calls: MessageStream, objects: Arc<Mutex<Objects>>) {
    while let Some(call) = next_message(&mut calls).await {
        let call = match call {
            Ok(call) => call,
            Err(e) => {
                tracing::warn!("D-Bus gateway: unreadable message: {e}");
                continue;
            }
        };
        if call
            .primary_header()
            .flags()
            .contains(Flags::NO_REPLY_EXPECTED)
        {
            continue;
        }
        let header = call.header();
        let built = match lock(&objects).answer(&call, &header) {
            Ok(reply) => Ok(reply),
            Err(error) => zbus::DBusError::create_reply(&error, &header),
        };
        let sent = match built {
            Ok(reply) => conn.send(&reply).await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            let member = header.member().map(|m| m.to_string()).unwrap_or_default();
            let path = header.path().map(|p| p.to_string()).unwrap_or_default();
            tracing::warn!(%path, %member, "D-Bus gateway: cannot reply: {e}");
        }
    }
    tracing::warn!("D-Bus gateway: the bus connection closed; no longer answering");
}

/// Keeps the objects of one publication in step with its subscription.
struct Mirror {
    conn: Connection,
    objects: Arc<Mutex<Objects>>,
    publisher: String,
    topic: &'static str,
    /// Only this tenant's values (and device-wide ones); `None`: every value.
    tenant: Option<String>,
}

impl Mirror {
    /// Whether `value` belongs in this mirror.
    fn shows<T: Topic>(&self, value: &T) -> bool {
        match (&self.tenant, value.tenant()) {
            (None, _) | (_, None) => true,
            (Some(mine), Some(theirs)) => mine == theirs,
        }
    }

    async fn run<T: Topic>(self, mut sub: Subscription<T>) {
        // The subscription retries a refusal every fraction of a second; say it once per streak.
        let mut refused = false;
        loop {
            let signal = match sub.recv().await {
                Event::Create { key, value }
                | Event::Modify {
                    key, new: value, ..
                } => {
                    if self.shows(&value) {
                        self.upsert(&key, &value)
                    } else {
                        self.remove(&key)
                    }
                }
                Event::Delete { key, .. } => self.remove(&key),
                Event::Synchronized => {
                    refused = false;
                    None
                }
                Event::Restarted => None,
                // The subscription itself deletes the keys the new publisher no longer has.
                Event::PublisherRestarted { epoch } => {
                    let (publisher, topic) = (&self.publisher, self.topic);
                    tracing::debug!(%publisher, topic, epoch, "D-Bus gateway: publisher restarted");
                    None
                }
                Event::Refused { reason } => {
                    if !refused {
                        let (publisher, topic) = (&self.publisher, self.topic);
                        let what = "D-Bus gateway refused by the publisher";
                        tracing::warn!(%publisher, topic, "{what}: {reason}");
                    }
                    refused = true;
                    None
                }
            };
            if let Some(signal) = signal
                && let Err(e) = self.conn.send(&signal).await
            {
                let (publisher, topic) = (&self.publisher, self.topic);
                tracing::warn!(%publisher, topic, "D-Bus gateway: cannot signal a change: {e}");
            }
        }
    }

    /// Creates or updates the object of `key`; the signal that announces it, if any.
    fn upsert<T: Topic>(&self, key: &str, value: &T) -> Option<Message> {
        let (publisher, topic) = (&self.publisher, self.topic);
        let path = object_path(publisher, topic, key);
        // The read-outs' JSON (states by name, as `cairn --json` prints them); the tree is
        // for `Fields`.
        let encoded = value
            .readout_json()
            .and_then(|tree| Ok((serde_json::to_string(&tree)?, tree)));
        let (json, fields) = match encoded {
            Ok((json, tree)) => (json, scalar_fields(&tree)),
            Err(e) => {
                let what = "D-Bus gateway: value is not JSON, not mirrored";
                tracing::warn!(%publisher, topic, %key, "{what}: {e}");
                return None;
            }
        };
        let mut objects = lock(&self.objects);
        let built = match objects.by_path.get_mut(&path) {
            None => {
                // `object_path` only makes valid paths; `from_str_unchecked` below relies on it.
                debug_assert!(ObjectPath::try_from(path.as_str()).is_ok(), "{path}");
                let object = TopicObject {
                    publisher: publisher.clone(),
                    topic,
                    key: key.to_string(),
                    json,
                    fields,
                };
                tracing::debug!(%path, %publisher, topic, %key, "D-Bus object added");
                let object = objects.by_path.entry(path.clone()).or_insert(object);
                let body = (ObjectPath::from_str_unchecked(&path), object.interfaces());
                Message::signal(ROOT_PATH, OBJECT_MANAGER, "InterfacesAdded").build(&body)
            }
            Some(object) => {
                let json_changed = object.json != json;
                let fields_changed = object.fields != fields;
                if !json_changed && !fields_changed {
                    return None;
                }
                object.json = json;
                object.fields = fields;
                let mut changed = BTreeMap::new();
                if json_changed {
                    changed.insert("Json", Variant::from(object.json.as_str()));
                }
                if fields_changed {
                    changed.insert("Fields", object.fields_variant());
                }
                let body = (INTERFACE, changed, Vec::<&str>::new());
                Message::signal(path.as_str(), PROPERTIES, "PropertiesChanged").build(&body)
            }
        };
        self.signal_or_warn(built)
    }

    /// Removes the object of `key`; the `InterfacesRemoved` that announces it.
    fn remove(&self, key: &str) -> Option<Message> {
        let (publisher, topic) = (&self.publisher, self.topic);
        let path = object_path(publisher, topic, key);
        lock(&self.objects).by_path.remove(&path)?;
        tracing::debug!(%path, %publisher, topic, %key, "D-Bus object removed");
        // A slice, not the array: zbus encodes a fixed-size array as a structure.
        let body = (
            ObjectPath::from_str_unchecked(&path),
            OBJECT_INTERFACES.as_slice(),
        );
        let built = Message::signal(ROOT_PATH, OBJECT_MANAGER, "InterfacesRemoved").build(&body);
        self.signal_or_warn(built)
    }

    fn signal_or_warn(&self, built: zbus::Result<Message>) -> Option<Message> {
        let (publisher, topic) = (&self.publisher, self.topic);
        built
            .inspect_err(
                |e| tracing::warn!(%publisher, topic, "D-Bus gateway: cannot build a signal: {e}"),
            )
            .ok()
    }
}

const PEER_XML: &str = r#"  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping"/>
    <method name="GetMachineId">
      <arg type="s" name="machine_uuid" direction="out"/>
    </method>
  </interface>
"#;

const INTROSPECTABLE_XML: &str = r#"  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect">
      <arg type="s" name="xml_data" direction="out"/>
    </method>
  </interface>
"#;

const PROPERTIES_XML: &str = r#"  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get">
      <arg type="s" name="interface_name" direction="in"/>
      <arg type="s" name="property_name" direction="in"/>
      <arg type="v" name="value" direction="out"/>
    </method>
    <method name="GetAll">
      <arg type="s" name="interface_name" direction="in"/>
      <arg type="a{sv}" name="properties" direction="out"/>
    </method>
    <method name="Set">
      <arg type="s" name="interface_name" direction="in"/>
      <arg type="s" name="property_name" direction="in"/>
      <arg type="v" name="value" direction="in"/>
    </method>
    <signal name="PropertiesChanged">
      <arg type="s" name="interface_name"/>
      <arg type="a{sv}" name="changed_properties"/>
      <arg type="as" name="invalidated_properties"/>
    </signal>
  </interface>
"#;

const TOPIC_XML: &str = r#"  <interface name="org.cairn.Topic1">
    <property name="Publisher" type="s" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="const"/>
    </property>
    <property name="Topic" type="s" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="const"/>
    </property>
    <property name="Key" type="s" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="const"/>
    </property>
    <property name="Json" type="s" access="read"/>
    <property name="Fields" type="a{ss}" access="read"/>
  </interface>
"#;

const OBJECT_MANAGER_XML: &str = r#"  <interface name="org.freedesktop.DBus.ObjectManager">
    <method name="GetManagedObjects">
      <arg type="a{oa{sa{sv}}}" name="object_paths_interfaces_and_properties" direction="out"/>
    </method>
    <signal name="InterfacesAdded">
      <arg type="o" name="object_path"/>
      <arg type="a{sa{sv}}" name="interfaces_and_properties"/>
    </signal>
    <signal name="InterfacesRemoved">
      <arg type="o" name="object_path"/>
      <arg type="as" name="interfaces"/>
    </signal>
  </interface>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_separators_map_to_valid_paths_and_back() {
        let key = "6ba7b810-9dad-11d1-80b4-00c04fd430c8#3";
        for awkward in [key, "a/b.c", "../x", "_", "__", "ä é", "x_2F", "#-./", "a"] {
            let path = object_path("volume-manager", "VolumeStatus", awkward);
            assert!(
                ObjectPath::try_from(path.as_str()).is_ok(),
                "{path} is not a valid object path"
            );
            let (publisher, topic, back) = parse_object_path(&path).expect("parses back");
            assert_eq!(
                (publisher.as_str(), topic.as_str(), back.as_str()),
                ("volume-manager", "VolumeStatus", awkward)
            );
        }
        assert_eq!(
            object_path("volume-manager", "VolumeStatus", "a#1-b.c/d_e"),
            "/org/cairn/volume_2Dmanager/VolumeStatus/a_231_2Db_2Ec_2Fd_5Fe"
        );
    }

    #[test]
    fn tenant_bus_names_are_valid_and_one_to_one() {
        let tenants = ["a", "", "tenant-1", "tenant_1", "0ops", "x9"];
        let names: BTreeSet<String> = tenants.iter().map(|t| tenant_bus_name(t)).collect();
        assert_eq!(names.len(), tenants.len(), "{names:?}");
        for name in &names {
            assert!(
                zbus::names::WellKnownName::try_from(name.as_str()).is_ok(),
                "{name} is not a valid bus name"
            );
        }
        assert_eq!(tenant_bus_name("a"), "org.cairn.Tenant.a");
        assert_eq!(tenant_bus_name("0ops"), "org.cairn.Tenant._0ops");
        assert_eq!(tenant_bus_name(""), "org.cairn.Tenant._");
    }

    #[test]
    fn the_policy_denies_by_default_and_allows_each_group_its_tenant() {
        let xml = tenant_policy(Some("technicians"), &[("a", "4411"), ("b", "tenant-b")]);
        let default = xml
            .split("<policy context=\"default\">")
            .nth(1)
            .and_then(|rest| rest.split("</policy>").next())
            .expect("a default policy");
        for name in ["org.cairn.Bus", "org.cairn.Tenant.a", "org.cairn.Tenant.b"] {
            assert!(default.contains(&format!("<deny send_destination=\"{name}\"/>")));
            assert!(default.contains(&format!("<deny receive_sender=\"{name}\"/>")));
        }
        let group = |g: &str| {
            xml.split(&format!("<policy group=\"{g}\">"))
                .nth(1)
                .and_then(|rest| rest.split("</policy>").next())
                .unwrap_or_else(|| panic!("no policy for {g}"))
                .to_string()
        };
        assert!(group("4411").contains("send_destination=\"org.cairn.Tenant.a\""));
        assert!(!group("4411").contains("org.cairn.Tenant.b"));
        assert!(!group("4411").contains("org.cairn.Bus"));
        assert!(group("tenant-b").contains("receive_sender=\"org.cairn.Tenant.b\""));
        assert!(group("technicians").contains("send_destination=\"org.cairn.Tenant.b\""));
        assert!(group("technicians").contains("send_destination=\"org.cairn.Bus\""));
    }

    #[test]
    fn the_empty_key_is_an_underscore_and_back() {
        assert_eq!(escape_path_element(""), "_");
        assert_eq!(unescape_path_element("_").as_deref(), Some(""));
    }

    #[test]
    fn only_canonical_elements_unescape() {
        for bad in ["", "_2", "_2f", "_41", "a-b", "_ZZ", "_FF"] {
            assert_eq!(unescape_path_element(bad), None, "{bad:?}");
        }
        assert_eq!(parse_object_path("/org/cairn/a/b"), None);
        assert_eq!(parse_object_path("/org/cairn/a/b/c/d"), None);
        assert_eq!(parse_object_path("/org/other/a/b/c"), None);
    }

    #[test]
    fn fields_are_the_top_level_scalars_as_text() {
        let json = serde_json::json!({
            "Name": "disk", "Size": 42, "Ratio": 0.5, "Ready": true,
            "Error": {"Error": "x"}, "Warnings": ["w"], "Pid": null
        });
        let fields = scalar_fields(&json);
        let expected: BTreeMap<String, String> = [
            ("Name", "disk"),
            ("Ratio", "0.5"),
            ("Ready", "true"),
            ("Size", "42"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(fields, expected);
        assert!(scalar_fields(&serde_json::json!([1, 2])).is_empty());
    }

    #[test]
    fn the_tree_lists_intermediate_nodes_down_to_objects() {
        let mut objects = Objects {
            by_path: BTreeMap::new(),
            machine_id: None,
        };
        assert_eq!(
            objects.children("/").into_iter().collect::<Vec<_>>(),
            ["org"]
        );
        assert_eq!(
            objects.children("/org").into_iter().collect::<Vec<_>>(),
            ["cairn"]
        );
        assert!(objects.children(ROOT_PATH).is_empty());
        let path = object_path("p", "T", "k");
        objects.by_path.insert(
            path.clone(),
            TopicObject {
                publisher: "p".into(),
                topic: "T",
                key: "k".into(),
                json: "{}".into(),
                fields: BTreeMap::new(),
            },
        );
        assert_eq!(
            objects.children(ROOT_PATH).into_iter().collect::<Vec<_>>(),
            ["p"]
        );
        assert_eq!(
            objects
                .children("/org/cairn/p/T")
                .into_iter()
                .collect::<Vec<_>>(),
            ["k"]
        );
        assert!(objects.is_node("/org/cairn/p"));
        assert!(!objects.is_node("/org/cairn/q"));
        assert!(!objects.is_node("/org/cair"));
        let xml = objects.introspect(&path).expect("an object introspects");
        assert!(xml.contains(r#"<property name="Json" type="s" access="read"/>"#));
        assert!(
            objects
                .introspect(ROOT_PATH)
                .expect("root")
                .contains(OBJECT_MANAGER)
        );
    }
}
