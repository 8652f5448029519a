locals {
  chart_path = coalesce(var.chart_path, "${path.module}/../../../charts/caduceus")

  hospitals = {
    for name, h in var.hospitals : name => merge(h, { namespace = coalesce(h.namespace, "hospital-${name}") })
  }
  hospital_namespaces = sort(distinct([for name, h in local.hospitals : h.namespace]))

  # Helm values. Only keys with a value are passed: a null would delete the chart's default.
  image = { for k, v in {
    repository = var.image.repository
    tag        = var.image.tag
    pullPolicy = var.image.pull_policy
  } : k => v if v != null }
  trainer_image    = { for k, v in var.workload_images.trainer : k => v if v != null }
  aggregator_image = { for k, v in var.workload_images.aggregator : k => v if v != null }
  workloads = { for k, v in {
    trainer      = length(local.trainer_image) > 0 ? { image = local.trainer_image } : null
    aggregator   = length(local.aggregator_image) > 0 ? { image = local.aggregator_image } : null
    endpointMode = var.endpoint_mode
  } : k => v if v != null }
  resources = var.resources == null ? {} : { for k, v in var.resources : k => v if v != null }

  # Role coordinator: gateway.*; role site: site.* (its one hospital's HospitalClient).
  gateway_service = { for k, v in {
    type                     = var.gateway.service_type
    nodePort                 = var.gateway.node_port
    annotations              = var.gateway.service_annotations
    loadBalancerSourceRanges = var.gateway.load_balancer_source_ranges
  } : k => v if v != null }
  gateway = { for k, v in {
    address     = var.gateway.address
    port        = var.gateway.port
    serverNames = var.gateway.server_names
    service     = length(local.gateway_service) > 0 ? local.gateway_service : null
  } : k => v if v != null }
  site = { for k, v in {
    hospital   = length(local.hospitals) == 1 ? one([for name, h in local.hospitals : "${h.namespace}/${name}"]) : null
    joinSecret = var.site_join_secret
  } : k => v if v != null }

  values = { for k, v in {
    crds           = { for k, v in var.crds : k => v if v != null }
    image          = local.image
    replicaCount   = var.replica_count
    leaderElection = var.leader_election_enabled == null ? null : { enabled = var.leader_election_enabled }
    workloads      = local.workloads
    metrics        = var.monitoring.service_monitor == null ? null : { serviceMonitor = { enabled = var.monitoring.service_monitor } }
    prometheusRule = var.monitoring.prometheus_rule == null ? null : { enabled = var.monitoring.prometheus_rule }
    dashboard      = var.monitoring.dashboard == null ? null : { enabled = var.monitoring.dashboard }
    # docs/sites.md: "all" is the chart's default and is not passed, so role all renders as before.
    role    = var.role == "all" ? null : var.role
    gateway = var.role == "coordinator" ? local.gateway : null
    site    = var.role == "site" ? local.site : null
    # The namespaces the operator serves: its Roles, CADUCEUS_WATCH_NAMESPACES, NetworkPolicies and the
    # admission policies' binding all follow them. A site serves its hospital's namespace (site.hospital)
    # and lists none; a coordinator has no hospital namespaces, and the sites namespace instead.
    namespaces = merge(
      {
        studies   = var.role == "site" ? [] : var.study_namespaces
        hospitals = var.role == "all" ? local.hospital_namespaces : []
      },
      var.role == "coordinator" ? { sites = var.sites_namespace } : {},
    )
    networkPolicy = merge(
      var.network_policy_enabled == null ? {} : { enabled = var.network_policy_enabled },
      length(var.api_server_cidrs) == 0 ? {} : { apiServer = { cidrs = var.api_server_cidrs } },
      var.role != "site" || length(var.coordinator_cidrs) == 0 ? {} : { coordinator = { cidrs = var.coordinator_cidrs } },
    )
    admissionPolicy = var.admission_policy_enabled == null ? null : { enabled = var.admission_policy_enabled }
    resources       = local.resources
  } : k => v if v != null && v != {} }

  # HospitalClient specs, shaped as in crds/fl.caduceus.dev_hospitalclients.yaml.
  hospital_specs = {
    for name, h in local.hospitals : name => merge(
      {
        data = {
          claimName = h.data.claim_name
          path      = h.data.path
          format    = h.data.format
        }
        privacyBudget = {
          epsilon = h.privacy_budget.epsilon
          delta   = h.privacy_budget.delta
        }
        consentedStudies = h.consented_studies
      },
      length(h.allowed_trainer_images) == 0 ? {} : { allowedTrainerImages = h.allowed_trainer_images },
      h.allow_non_private_studies ? { allowNonPrivateStudies = true } : {},
      h.trainer == null ? {} : {
        trainer = { for k, v in {
          nodeSelector = h.trainer.node_selector
          resources    = h.trainer.resources == null ? null : { for k, v in h.trainer.resources : k => v if v != null }
          tolerations = h.trainer.tolerations == null ? null : [
            for t in h.trainer.tolerations : { for k, v in {
              key               = t.key
              operator          = t.operator
              value             = t.value
              effect            = t.effect
              tolerationSeconds = t.toleration_seconds
            } : k => v if v != null }
          ]
        } : k => v if v != null }
      },
    )
  }
}

resource "kubernetes_namespace" "operator" {
  count = var.create_namespace ? 1 : 0

  metadata {
    name = var.namespace
    labels = {
      "app.kubernetes.io/part-of"    = "caduceus"
      "app.kubernetes.io/managed-by" = "terraform"
    }
  }
}

resource "kubernetes_namespace" "study" {
  for_each = var.create_study_namespaces ? toset(var.study_namespaces) : toset([])

  metadata {
    name = each.key
    labels = {
      "app.kubernetes.io/part-of"    = "caduceus"
      "app.kubernetes.io/managed-by" = "terraform"
      "caduceus.dev/role"            = "study"
    }
  }
}

# Role coordinator: the hospitals' mirror HospitalClients live here (made by the gateway, not by this module).
resource "kubernetes_namespace" "sites" {
  count = var.role == "coordinator" && var.create_sites_namespace ? 1 : 0

  metadata {
    name = var.sites_namespace
    labels = {
      "app.kubernetes.io/part-of"    = "caduceus"
      "app.kubernetes.io/managed-by" = "terraform"
      "caduceus.dev/role"            = "sites"
    }
  }
}

resource "kubernetes_namespace" "hospital" {
  for_each = { for name, h in local.hospitals : name => h if h.create_namespace }

  metadata {
    name = each.value.namespace
    labels = merge(each.value.namespace_labels, {
      "app.kubernetes.io/part-of"    = "caduceus"
      "app.kubernetes.io/managed-by" = "terraform"
      "caduceus.dev/role"            = "hospital"
      "caduceus.dev/hospital"        = each.key
    })
  }
}

# The operator: CRDs, controller, RBAC (a ClusterRole for the custom resources only, Roles in its own,
# the study and the hospital namespaces), NetworkPolicies, admission policies, monitoring, from
# charts/caduceus.
resource "helm_release" "caduceus" {
  name      = var.release_name
  namespace = var.create_namespace ? kubernetes_namespace.operator[0].metadata[0].name : var.namespace
  chart     = local.chart_path
  values    = concat([yamlencode(local.values)], var.extra_values)

  atomic          = true
  cleanup_on_fail = true
  wait            = true
  timeout         = var.helm_timeout
  max_history     = 10

  # The chart renders Roles, RoleBindings and NetworkPolicies into the study and hospital namespaces,
  # which must exist first.
  depends_on = [kubernetes_namespace.study, kubernetes_namespace.hospital, kubernetes_namespace.sites]

  lifecycle {
    precondition {
      condition     = fileexists("${local.chart_path}/Chart.yaml")
      error_message = "No Helm chart at ${local.chart_path} (no Chart.yaml); set chart_path."
    }
    precondition {
      condition     = var.role != "all" || (length(var.study_namespaces) > 0 && length(local.hospitals) > 0)
      error_message = "The operator serves only the namespaces it is given: set study_namespaces and at least one hospital (the chart's namespaces.studies and namespaces.hospitals)."
    }
    precondition {
      condition     = var.role != "coordinator" || (length(var.study_namespaces) > 0 && length(local.hospitals) == 0 && var.gateway.address != null)
      error_message = "role coordinator: set study_namespaces and gateway.address (the host:port the sites dial), and no hospitals (they are sites: each installs this module with role = \"site\", and its mirror appears in sites_namespace)."
    }
    precondition {
      condition     = var.role != "site" || (length(local.hospitals) == 1 && length(var.study_namespaces) == 0)
      error_message = "role site: exactly one hospital (the site's own HospitalClient, site.hospital) and no study_namespaces (the studies live in the coordinator's cluster)."
    }
    precondition {
      condition     = var.role != "site" || var.network_policy_enabled == false || length(var.coordinator_cidrs) > 0
      error_message = "role site with NetworkPolicies on (the chart's default): set coordinator_cidrs to the coordinator's gateway and aggregator addresses, or network_policy_enabled = false."
    }
    precondition {
      condition     = var.network_policy_enabled == false || length(var.api_server_cidrs) > 0
      error_message = "NetworkPolicies are on (the chart's default): set api_server_cidrs to the API server's endpoint addresses (kubectl get endpointslices -n default -l kubernetes.io/service-name=kubernetes), or network_policy_enabled = false."
    }
  }
}

# One HospitalClient per hospital, in its namespace. The kubernetes provider that can be built offline
# (v1.13.4) has no kubernetes_manifest, so each HospitalClient is a release of a one-template local chart
# (charts/hospital-client). It depends on the operator's release, which installs the CRD.
resource "helm_release" "hospital" {
  for_each = local.hospitals

  name      = "hc-${each.key}"
  namespace = each.value.create_namespace ? kubernetes_namespace.hospital[each.key].metadata[0].name : each.value.namespace
  chart     = "${path.module}/charts/hospital-client"
  values = [yamlencode({
    name   = each.key
    labels = each.value.labels
    spec   = local.hospital_specs[each.key]
  })]

  atomic      = true
  wait        = true
  timeout     = var.helm_timeout
  max_history = 5

  depends_on = [helm_release.caduceus]
}
