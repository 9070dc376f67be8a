//! The cluster view: Pacemaker's nodes and resources from
//! `crm_mon --output-as=xml`, and "move to node" through
//! `crm_resource --move`, so the cluster (not this page) migrates a guest it
//! manages. The tools run as they are found on PATH and honour `CIB_file`
//! (offline CIB files, as the tests use).

use std::process::Stdio;
use std::time::Duration;

use config::ErrorClass;
use serde::Serialize;

/// How long a Pacemaker tool may take.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Pacemaker's command-line tools are not installed ({tool} was not found)")]
    NotInstalled { tool: &'static str },
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {message}")]
    Failed { tool: &'static str, message: String },
    #[error("{tool} did not finish within {} s", TOOL_TIMEOUT.as_secs())]
    Timeout { tool: &'static str },
    #[error("cannot read crm_mon's XML: {0}")]
    Parse(String),
    #[error("the cluster has no resource {0:?} that can be moved")]
    NoSuchResource(String),
    #[error("the cluster has no node {0:?}")]
    NoSuchNode(String),
    #[error("node {node} is {state}: the cluster cannot run {resource} there")]
    NodeUnavailable {
        node: String,
        state: String,
        resource: String,
    },
}

impl ClusterError {
    pub fn class(&self) -> ErrorClass {
        match self {
            ClusterError::NoSuchResource(_) | ClusterError::NoSuchNode(_) => ErrorClass::Caller,
            ClusterError::NodeUnavailable { .. } | ClusterError::Failed { .. } => {
                ErrorClass::Conflict
            }
            _ => ErrorClass::Host,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClusterNode {
    pub name: String,
    pub online: bool,
    /// `online`, `standby`, `maintenance`, `unclean`, `shutting down`, `offline`.
    pub state: String,
    pub is_dc: bool,
    pub resources_running: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClusterResource {
    pub id: String,
    /// `ocf:rustvmm:vmm`, or `group`/`clone` for containers.
    pub agent: String,
    pub role: String,
    /// Where it runs.
    pub nodes: Vec<String>,
    pub managed: bool,
    pub failed: bool,
    /// A guest of this VMM (agent `ocf:*:vmm`).
    pub guest: bool,
    /// A top-level primitive or group: `crm_resource --move` applies.
    pub movable: bool,
    /// The group or clone it belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClusterFailure {
    pub resource: String,
    pub node: String,
    pub operation: String,
    pub status: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClusterView {
    /// Whether a cluster answered; if not, `reason` says why in words.
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub stack: String,
    pub dc: Option<String>,
    pub quorum: Option<bool>,
    pub nodes: Vec<ClusterNode>,
    pub resources: Vec<ClusterResource>,
    pub failures: Vec<ClusterFailure>,
}

fn child<'a, 'i>(parent: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    parent.children().find(|c| c.has_tag_name(name))
}

fn attr_bool(node: roxmltree::Node, name: &str) -> bool {
    node.attribute(name) == Some("true")
}

fn attr(node: roxmltree::Node, name: &str) -> String {
    node.attribute(name).unwrap_or_default().to_string()
}

/// Parses the output of `crm_mon --output-as=xml`.
pub fn parse_crm_mon(xml: &str) -> Result<ClusterView, ClusterError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| ClusterError::Parse(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "pacemaker-result" {
        return Err(ClusterError::Parse(format!(
            "the root element is <{}>, not <pacemaker-result>",
            root.tag_name().name()
        )));
    }
    let mut view = ClusterView {
        available: true,
        ..ClusterView::default()
    };
    let status = child(root, "status");
    let errors: Vec<&str> = status
        .iter()
        .flat_map(|s| s.descendants())
        .filter(|e| e.has_tag_name("error"))
        .filter_map(|e| e.text())
        .map(str::trim)
        .collect();
    let failed = status.is_some_and(|s| s.attribute("code").is_some_and(|c| c != "0"));
    // crm_mon can say "OK" with errors and no cluster in it (CIB unreachable).
    let empty = child(root, "nodes").is_none() && child(root, "summary").is_none();
    if failed || empty {
        let mut message = status
            .map(|s| attr(s, "message"))
            .filter(|m| !m.is_empty() && (failed || errors.is_empty()))
            .unwrap_or_default();
        if !errors.is_empty() {
            let joined = errors.join("; ");
            message = if message.is_empty() {
                joined
            } else {
                format!("{message} ({joined})")
            };
        }
        if message.is_empty() {
            message = "no cluster status in its output".into();
        }
        return Err(ClusterError::Failed {
            tool: "crm_mon",
            message,
        });
    }
    if let Some(summary) = child(root, "summary") {
        if let Some(stack) = child(summary, "stack") {
            view.stack = attr(stack, "type");
        }
        if let Some(dc) = child(summary, "current_dc") {
            if attr_bool(dc, "present") {
                view.dc = dc.attribute("name").map(str::to_string);
                view.quorum = Some(attr_bool(dc, "with_quorum"));
            }
        }
    }
    if let Some(nodes) = child(root, "nodes") {
        for node in nodes.children().filter(|c| c.has_tag_name("node")) {
            let online = attr_bool(node, "online");
            let state = if attr_bool(node, "unclean") {
                "unclean"
            } else if !online {
                "offline"
            } else if attr_bool(node, "shutdown") {
                "shutting down"
            } else if attr_bool(node, "maintenance") {
                "maintenance"
            } else if attr_bool(node, "standby") {
                "standby"
            } else {
                "online"
            };
            view.nodes.push(ClusterNode {
                name: attr(node, "name"),
                online,
                state: state.into(),
                is_dc: attr_bool(node, "is_dc"),
                resources_running: node
                    .attribute("resources_running")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0),
            });
        }
    }
    if let Some(resources) = child(root, "resources") {
        for item in resources.children().filter(|c| c.is_element()) {
            collect_resource(&mut view.resources, item, None, true);
        }
    }
    if let Some(failures) = child(root, "failures") {
        for failure in failures.children().filter(|c| c.has_tag_name("failure")) {
            let op_key = attr(failure, "op_key");
            // op_key is RESOURCE_OPERATION_INTERVAL (e.g. vm1_monitor_10000).
            let mut parts = op_key.rsplitn(3, '_');
            let (_, operation, resource) = (parts.next(), parts.next(), parts.next());
            view.failures.push(ClusterFailure {
                resource: resource.unwrap_or(&op_key).to_string(),
                operation: operation.unwrap_or_default().to_string(),
                node: attr(failure, "node"),
                status: attr(failure, "status"),
                reason: attr(failure, "exitreason"),
            });
        }
    }
    Ok(view)
}

/// Adds a `<resource>`, `<group>` or `<clone>` (and what it holds).
/// Instances of a clone appear once with every node they run on.
fn collect_resource(
    out: &mut Vec<ClusterResource>,
    item: roxmltree::Node,
    parent: Option<&str>,
    top_level: bool,
) {
    let id = attr(item, "id");
    match item.tag_name().name() {
        "resource" => {
            let nodes: Vec<String> = item
                .children()
                .filter(|c| c.has_tag_name("node"))
                .map(|n| attr(n, "name"))
                .collect();
            let agent = attr(item, "resource_agent");
            if let Some(existing) = out
                .iter_mut()
                .find(|r| r.id == id && r.parent.as_deref() == parent)
            {
                existing.nodes.extend(nodes);
                return;
            }
            out.push(ClusterResource {
                guest: agent.starts_with("ocf:") && agent.ends_with(":vmm"),
                agent,
                role: attr(item, "role"),
                nodes,
                managed: attr_bool(item, "managed"),
                failed: attr_bool(item, "failed"),
                movable: top_level,
                parent: parent.map(str::to_string),
                id,
            });
        }
        kind @ ("group" | "clone" | "bundle") => {
            // Clone instances are groups named ID:N: list them under the clone.
            let (own, into_parent) = match (kind, parent) {
                ("group", Some(p)) if id.contains(':') => (None, Some(p.to_string())),
                _ => (Some(id.clone()), Some(id.clone())),
            };
            if let Some(own) = own {
                if !out.iter().any(|r| r.id == own && r.parent.is_none()) {
                    out.push(ClusterResource {
                        id: own,
                        agent: kind.into(),
                        role: String::new(),
                        nodes: Vec::new(),
                        managed: attr_bool(item, "managed"),
                        failed: attr_bool(item, "failed"),
                        guest: false,
                        movable: top_level && kind == "group",
                        parent: parent.map(str::to_string),
                    });
                }
            }
            for member in item.children().filter(|c| c.is_element()) {
                collect_resource(out, member, into_parent.as_deref(), false);
            }
        }
        _ => {}
    }
}

struct ToolOutput {
    success: bool,
    stdout: String,
    /// stderr in words, or the exit status if it printed nothing.
    failure: String,
}

/// Runs a Pacemaker tool to its end (or [`TOOL_TIMEOUT`]).
async fn run_tool(tool: &'static str, args: &[&str]) -> Result<ToolOutput, ClusterError> {
    let child = tokio::process::Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ClusterError::NotInstalled { tool },
            _ => ClusterError::Spawn { tool, source },
        })?;
    let output = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| ClusterError::Timeout { tool })?
        .map_err(|source| ClusterError::Spawn { tool, source })?;
    let mut failure = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if failure.is_empty() {
        failure = format!("{}", output.status);
    }
    Ok(ToolOutput {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        failure,
    })
}

/// Runs a tool that must succeed; its stdout.
async fn run_ok(tool: &'static str, args: &[&str]) -> Result<String, ClusterError> {
    let out = run_tool(tool, args).await?;
    if out.success {
        Ok(out.stdout)
    } else {
        Err(ClusterError::Failed {
            tool,
            message: out.failure,
        })
    }
}

/// The cluster as `crm_mon` sees it; a host without a running cluster
/// gives a view with `available: false` and the reason.
pub async fn cluster_view() -> ClusterView {
    let result = async {
        let out = run_tool("crm_mon", &["--output-as=xml"]).await?;
        // crm_mon answers in XML even when it fails (no cluster running):
        // its status element says why.
        if out.stdout.trim_start().starts_with('<') {
            parse_crm_mon(&out.stdout)
        } else {
            Err(ClusterError::Failed {
                tool: "crm_mon",
                message: out.failure,
            })
        }
    }
    .await;
    result.unwrap_or_else(|e| ClusterView {
        available: false,
        reason: Some(e.to_string()),
        ..ClusterView::default()
    })
}

/// Asks the cluster to move `resource` to `node` (`crm_resource --move`,
/// which adds a `cli-prefer-RESOURCE` location constraint). Both must be in
/// the current view: nothing the page sends reaches the tool unchecked.
pub async fn move_resource(resource: &str, node: &str) -> Result<String, ClusterError> {
    let view = cluster_view().await;
    if !view.available {
        return Err(ClusterError::Failed {
            tool: "crm_mon",
            message: view.reason.unwrap_or_default(),
        });
    }
    let target = view
        .resources
        .iter()
        .find(|r| r.id == resource && r.movable)
        .ok_or_else(|| ClusterError::NoSuchResource(resource.into()))?;
    let node_info = view
        .nodes
        .iter()
        .find(|n| n.name == node)
        .ok_or_else(|| ClusterError::NoSuchNode(node.into()))?;
    if node_info.state != "online" {
        return Err(ClusterError::NodeUnavailable {
            node: node.into(),
            state: node_info.state.clone(),
            resource: resource.into(),
        });
    }
    let out = run_ok(
        "crm_resource",
        &[
            "--move",
            "--resource",
            &target.id,
            "--node",
            &node_info.name,
        ],
    )
    .await?;
    Ok(format!(
        "the cluster was asked to move {resource} to {node}{}",
        if out.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", out.trim())
        }
    ))
}

/// Removes the constraints earlier moves added (`crm_resource --clear`).
pub async fn clear_resource(resource: &str) -> Result<String, ClusterError> {
    let view = cluster_view().await;
    let target = view
        .resources
        .iter()
        .find(|r| r.id == resource && r.movable)
        .ok_or_else(|| ClusterError::NoSuchResource(resource.into()))?;
    let out = run_ok("crm_resource", &["--clear", "--resource", &target.id]).await?;
    Ok(format!(
        "the move constraints of {resource} were cleared{}",
        if out.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", out.trim())
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Abridged from `crm_mon --output-as=xml` (Pacemaker 2.1.5) on the LVM
    /// recipe's CIB after `crm_simulate -S`, plus a failure and a standby node.
    const CRM_MON: &str = r#"<pacemaker-result api-version="2.25" request="crm_mon --output-as=xml">
  <summary>
    <stack type="corosync"/>
    <current_dc present="true" version="2.1.5" name="node1" id="1" with_quorum="true"/>
  </summary>
  <nodes>
    <node name="node1" id="1" online="true" standby="false" maintenance="false" unclean="false" shutdown="false" is_dc="true" resources_running="5" type="member"/>
    <node name="node2" id="2" online="true" standby="true" maintenance="false" unclean="false" shutdown="false" is_dc="false" resources_running="4" type="member"/>
    <node name="node3" id="3" online="false" standby="false" maintenance="false" unclean="false" shutdown="false" is_dc="false" resources_running="0" type="member"/>
  </nodes>
  <resources>
    <clone id="locking-clone" multi_state="false" unique="false" managed="true" disabled="false" failed="false" failure_ignored="false">
      <group id="locking:0" number_resources="2" managed="true" disabled="false">
        <resource id="dlm" resource_agent="ocf:pacemaker:controld" role="Started" active="true" managed="true" failed="false" nodes_running_on="1">
          <node name="node1" id="1" cached="true"/>
        </resource>
      </group>
      <group id="locking:1" number_resources="2" managed="true" disabled="false">
        <resource id="dlm" resource_agent="ocf:pacemaker:controld" role="Started" active="true" managed="true" failed="false" nodes_running_on="1">
          <node name="node2" id="2" cached="true"/>
        </resource>
      </group>
    </clone>
    <resource id="vm1" resource_agent="ocf:rustvmm:vmm" role="Started" active="true" orphaned="false" blocked="false" managed="true" failed="false" failure_ignored="false" nodes_running_on="1">
      <node name="node1" id="1" cached="true"/>
    </resource>
    <group id="web" number_resources="1" managed="true" disabled="false">
      <resource id="web-ip" resource_agent="ocf:heartbeat:IPaddr2" role="Stopped" active="false" managed="true" failed="false" nodes_running_on="0"/>
    </group>
  </resources>
  <failures>
    <failure op_key="vm1_monitor_10000" node="node2" exitstatus="not running" exitreason="the VMM exited with code 4 (guest crashed)" exitcode="7" call="12" status="complete" interval="10000" task="monitor"/>
  </failures>
  <status code="0" message="OK"/>
</pacemaker-result>"#;

    #[test]
    fn crm_mon_xml_gives_nodes_guests_and_failures() {
        let view = parse_crm_mon(CRM_MON).unwrap();
        assert!(view.available);
        assert_eq!(view.stack, "corosync");
        assert_eq!(view.dc.as_deref(), Some("node1"));
        assert_eq!(view.quorum, Some(true));
        let states: Vec<(&str, &str)> = view
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.state.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                ("node1", "online"),
                ("node2", "standby"),
                ("node3", "offline")
            ]
        );
        let vm1 = view.resources.iter().find(|r| r.id == "vm1").unwrap();
        assert!(vm1.guest && vm1.movable && vm1.managed && !vm1.failed);
        assert_eq!(vm1.nodes, ["node1"]);
        // Clone instances fold into one row with both nodes, not movable.
        let dlm: Vec<_> = view.resources.iter().filter(|r| r.id == "dlm").collect();
        assert_eq!(dlm.len(), 1);
        assert_eq!(dlm[0].nodes, ["node1", "node2"]);
        assert_eq!(dlm[0].parent.as_deref(), Some("locking-clone"));
        assert!(!dlm[0].movable);
        let clone = view.resources.iter().find(|r| r.id == "locking-clone");
        assert!(clone.is_some_and(|c| !c.movable && c.agent == "clone"));
        let group = view.resources.iter().find(|r| r.id == "web").unwrap();
        assert!(group.movable);
        assert_eq!(
            view.failures,
            [ClusterFailure {
                resource: "vm1".into(),
                node: "node2".into(),
                operation: "monitor".into(),
                status: "complete".into(),
                reason: "the VMM exited with code 4 (guest crashed)".into(),
            }]
        );
    }

    #[test]
    fn bad_xml_and_failed_status_are_errors_in_words() {
        let e = parse_crm_mon("<html>").unwrap_err();
        assert!(
            e.to_string().starts_with("cannot read crm_mon's XML"),
            "{e}"
        );
        let e = parse_crm_mon("<other/>").unwrap_err();
        assert!(e.to_string().contains("<other>"), "{e}");
        // What crm_mon prints on a host where no cluster runs.
        let e = parse_crm_mon(
            r#"<pacemaker-result api-version="2.25" request="crm_mon --output-as=xml">
  <status code="102" message="Not connected">
    <errors>
      <error>crm_mon: Connection to cluster failed: Connection refused</error>
    </errors>
  </status>
</pacemaker-result>"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "crm_mon failed: Not connected (crm_mon: Connection to cluster failed: Connection refused)"
        );
        // What it prints, with status OK, when the CIB cannot be read.
        let e = parse_crm_mon(
            r#"<pacemaker-result api-version="2.25" request="crm_mon --output-as=xml">
  <status code="0" message="OK">
    <errors>
      <error>Could not connect to the CIB: No such device or address</error>
    </errors>
  </status>
</pacemaker-result>"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "crm_mon failed: Could not connect to the CIB: No such device or address"
        );
    }
}
