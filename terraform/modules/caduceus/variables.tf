# Inputs of the Caduceus module. A null value means "leave the chart's default"; such keys are left out of
# the values passed to Helm (a null in Helm values would delete the chart's default instead).

variable "release_name" {
  description = "Name of the Helm release of the operator chart."
  type        = string
  default     = "caduceus"

  validation {
    # Helm limits release names to 53 characters (DNS label minus room for suffixes).
    condition     = length(var.release_name) <= 53 && can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.release_name))
    error_message = "release_name must be a DNS label (lower-case alphanumerics and '-', starting and ending alphanumeric) of at most 53 characters."
  }
}

variable "role" {
  description = "The chart's role (docs/sites.md): \"all\" (one cluster, the default), \"coordinator\" (studies, rounds and the site gateway; no hospitals here, they are sites) or \"site\" (one hospital's cluster: exactly one entry in hospitals, no study namespaces)."
  type        = string
  default     = "all"
  nullable    = false

  validation {
    condition     = contains(["all", "coordinator", "site"], var.role)
    error_message = "role must be \"all\", \"coordinator\" or \"site\"."
  }
}

variable "gateway" {
  description = <<-EOT
    Role coordinator: the site gateway (the chart's gateway.*).
      address                      host:port the sites dial, written into join bundles (required)
      port                         container and Service port (chart default 7443)
      server_names                 more DNS names/IPs for the gateway's certificate
      service_type                 ClusterIP, NodePort or LoadBalancer (chart default ClusterIP)
      node_port                    a fixed node port (30000-32767)
      service_annotations          annotations of the gateway Service (e.g. a cloud load balancer's)
      load_balancer_source_ranges  with LoadBalancer: the CIDRs the hospitals dial from
  EOT
  type = object({
    address                     = optional(string)
    port                        = optional(number)
    server_names                = optional(list(string))
    service_type                = optional(string)
    node_port                   = optional(number)
    service_annotations         = optional(map(string))
    load_balancer_source_ranges = optional(list(string))
  })
  default  = {}
  nullable = false

  validation {
    condition     = var.gateway.address == null || can(regex("^(\\[[0-9a-fA-F:.]+\\]|[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?):[0-9]{1,5}$", coalesce(var.gateway.address, "-")))
    error_message = "gateway.address must be host:port (e.g. fl.example.org:7443)."
  }
  validation {
    condition     = var.gateway.service_type == null || contains(["ClusterIP", "NodePort", "LoadBalancer"], coalesce(var.gateway.service_type, "-"))
    error_message = "gateway.service_type must be ClusterIP, NodePort or LoadBalancer."
  }
  validation {
    condition     = var.gateway.port == null || try(var.gateway.port >= 1 && var.gateway.port <= 65535 && floor(var.gateway.port) == var.gateway.port, false)
    error_message = "gateway.port must be a port number (1-65535)."
  }
  validation {
    condition     = var.gateway.node_port == null || try(var.gateway.node_port >= 30000 && var.gateway.node_port <= 32767 && floor(var.gateway.node_port) == var.gateway.node_port, false)
    error_message = "gateway.node_port must be in 30000-32767."
  }
}

variable "sites_namespace" {
  description = "Role coordinator: namespace of the hospitals' mirror HospitalClients (namespaces.sites, CADUCEUS_SITES_NAMESPACE)."
  type        = string
  default     = "caduceus-sites"
  nullable    = false

  validation {
    condition     = length(var.sites_namespace) <= 63 && can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.sites_namespace))
    error_message = "sites_namespace must be a DNS label (lower-case alphanumerics and '-', starting and ending alphanumeric, at most 63 characters)."
  }
}

variable "create_sites_namespace" {
  description = "Role coordinator: create sites_namespace (kubernetes_namespace)."
  type        = bool
  default     = true
}

variable "site_join_secret" {
  description = "Role site: name of the join Secret in the operator's namespace (site.joinSecret; the chart's default is caduceus-join). Apply the Secret that `caduceus-operator join-token create` printed before the site's first start; this module does not hold the token."
  type        = string
  default     = null

  validation {
    condition     = var.site_join_secret == null || try(length(var.site_join_secret) <= 63 && can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.site_join_secret)), false)
    error_message = "site_join_secret must be a DNS label of at most 63 characters."
  }
}

variable "coordinator_cidrs" {
  description = "Role site: networkPolicy.coordinator.cidrs, the coordinator's addresses (gateway and aggregators) as CIDRs, the only outside addresses the site agent and its trainers may reach. Required with role site unless network_policy_enabled = false."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for c in var.coordinator_cidrs : can(cidrhost(c, 0)) && strcontains(c, "/")])
    error_message = "Every coordinator_cidrs entry must be a CIDR such as 203.0.113.10/32."
  }
}

variable "namespace" {
  description = "Namespace of the operator (the Helm release's namespace)."
  type        = string
  default     = "caduceus-system"

  validation {
    condition     = length(var.namespace) <= 63 && can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.namespace))
    error_message = "namespace must be a DNS label (lower-case alphanumerics and '-', starting and ending alphanumeric, at most 63 characters)."
  }
}

variable "create_namespace" {
  description = "Create the operator's namespace (kubernetes_namespace). Set false if it already exists."
  type        = bool
  default     = true
}

variable "chart_path" {
  description = "Path of the Caduceus Helm chart. Null: the chart in this repository (charts/caduceus)."
  type        = string
  default     = null

  validation {
    condition     = var.chart_path == null || try(length(trimspace(var.chart_path)) > 0, false)
    error_message = "chart_path must not be empty when set."
  }
}

variable "helm_timeout" {
  description = "Seconds Helm waits for the release's resources to become ready."
  type        = number
  default     = 300

  validation {
    condition     = var.helm_timeout > 0 && floor(var.helm_timeout) == var.helm_timeout
    error_message = "helm_timeout must be a positive whole number of seconds."
  }
}

variable "crds" {
  description = "crds.create: install the CRDs with the chart; crds.keep: keep them (and so every study and hospital) when the release is deleted."
  type = object({
    create = optional(bool)
    keep   = optional(bool)
  })
  default  = {}
  nullable = false
}

variable "image" {
  description = "Operator image (image.repository, image.tag, image.pullPolicy). Null fields keep the chart's defaults."
  type = object({
    repository  = optional(string)
    tag         = optional(string)
    pull_policy = optional(string)
  })
  default  = {}
  nullable = false

  validation {
    condition     = var.image.repository == null || try(can(regex("^[^\\s]+$", var.image.repository)), false)
    error_message = "image.repository must be non-empty and contain no whitespace when set."
  }
  validation {
    condition     = var.image.tag == null || try(can(regex("^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", var.image.tag)), false)
    error_message = "image.tag must be a non-empty image tag ([A-Za-z0-9_][A-Za-z0-9_.-]{0,127}) when set."
  }
  validation {
    condition     = var.image.pull_policy == null || contains(["Always", "IfNotPresent", "Never"], coalesce(var.image.pull_policy, "-"))
    error_message = "image.pull_policy must be one of Always, IfNotPresent, Never."
  }
}

variable "replica_count" {
  description = "Operator replicas (replicaCount). More than one needs leader election."
  type        = number
  default     = null

  validation {
    condition     = var.replica_count == null || try(var.replica_count >= 1 && floor(var.replica_count) == var.replica_count, false)
    error_message = "replica_count must be a whole number >= 1."
  }
}

variable "leader_election_enabled" {
  description = "leaderElection.enabled. Null keeps the chart's default."
  type        = bool
  default     = null
}

variable "workload_images" {
  description = "Images of the pods the operator starts: workloads.trainer.image and workloads.aggregator.image."
  type = object({
    trainer = optional(object({
      repository = optional(string)
      tag        = optional(string)
    }), {})
    aggregator = optional(object({
      repository = optional(string)
      tag        = optional(string)
    }), {})
  })
  default  = {}
  nullable = false

  validation {
    condition = alltrue([
      for img in [var.workload_images.trainer, var.workload_images.aggregator] :
      img.repository == null || try(can(regex("^[^\\s]+$", img.repository)), false)
    ])
    error_message = "workload_images.*.repository must be non-empty and contain no whitespace when set."
  }
  validation {
    condition = alltrue([
      for img in [var.workload_images.trainer, var.workload_images.aggregator] :
      img.tag == null || try(can(regex("^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", img.tag)), false)
    ])
    error_message = "workload_images.*.tag must be a non-empty image tag ([A-Za-z0-9_][A-Za-z0-9_.-]{0,127}) when set."
  }
}

variable "endpoint_mode" {
  description = "workloads.endpointMode: how trainers reach the aggregator, \"service\" (a Service per round) or \"loopback\" (single-node test clusters)."
  type        = string
  default     = null

  validation {
    condition     = var.endpoint_mode == null || contains(["service", "loopback"], coalesce(var.endpoint_mode, "-"))
    error_message = "endpoint_mode must be \"service\" or \"loopback\"."
  }
}

variable "monitoring" {
  description = "metrics.serviceMonitor.enabled, prometheusRule.enabled and dashboard.enabled (the first two need the Prometheus Operator's CRDs)."
  type = object({
    service_monitor = optional(bool)
    prometheus_rule = optional(bool)
    dashboard       = optional(bool)
  })
  default  = {}
  nullable = false
}

variable "network_policy_enabled" {
  description = "networkPolicy.enabled (the chart's default is true). While it is not false, api_server_cidrs is required."
  type        = bool
  default     = null
}

variable "api_server_cidrs" {
  description = "networkPolicy.apiServer.cidrs: the API server's endpoint addresses as CIDRs (kubectl get endpointslices -n default -l kubernetes.io/service-name=kubernetes), the only addresses the operator may reach. Required unless network_policy_enabled = false."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for c in var.api_server_cidrs : can(cidrhost(c, 0)) && strcontains(c, "/")])
    error_message = "Every api_server_cidrs entry must be a CIDR such as 10.0.0.10/32 or fd00::10/128."
  }
}

variable "admission_policy_enabled" {
  description = "admissionPolicy.enabled: the ValidatingAdmissionPolicies that let only the operator's Jobs and their Pods carry the operator's label (needs Kubernetes >= 1.30). Null keeps the chart's default (true)."
  type        = bool
  default     = null
}

variable "resources" {
  description = "Resources of the operator container (resources.requests / resources.limits)."
  type = object({
    requests = optional(map(string))
    limits   = optional(map(string))
  })
  default = null
}

variable "study_namespaces" {
  description = "Namespaces where FederatedStudy objects live (namespaces.studies): the operator gets Roles and watches Jobs, Secrets and Pods there. The hospitals' namespaces become namespaces.hospitals."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for ns in var.study_namespaces : length(ns) <= 63 && can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", ns))])
    error_message = "Every study namespace must be a DNS label (lower-case alphanumerics and '-', starting and ending alphanumeric, at most 63 characters)."
  }
  validation {
    condition     = length(distinct(var.study_namespaces)) == length(var.study_namespaces)
    error_message = "study_namespaces must not repeat a namespace."
  }
}

variable "create_study_namespaces" {
  description = "Create the study namespaces (kubernetes_namespace)."
  type        = bool
  default     = true
}

variable "hospitals" {
  description = <<-EOT
    Hospitals, by HospitalClient name. For each one the module creates its namespace (unless
    create_namespace = false) and a HospitalClient (fl.caduceus.dev/v1alpha1) in it:
      namespace          default "hospital-<name>"
      data               claim_name (PVC in that namespace), path (default "/"), format ("Manifest" | "UtkfaceFilenames")
      privacy_budget     epsilon in (0, 1000], delta in (0, 1) (default 1e-5)
      consented_studies  "<namespace>/<study>@<consent hash>" of the FederatedStudies it joins (the hash is
                         the study's status.consentHash; a bare name is accepted but never admitted)
      allowed_trainer_images  trainer images that may run on its data: digests "sha256:<64 hex>", images
                         pinned by digest "repo@sha256:<64 hex>", or prefixes ending in "/" (default
                         empty: only the operator's own trainer image)
      allow_non_private_studies  whether it may join studies without DP-SGD (default false)
      trainer            optional scheduling hints (node_selector, resources, tolerations)
  EOT
  type = map(object({
    namespace        = optional(string)
    create_namespace = optional(bool, true)
    namespace_labels = optional(map(string), {})
    labels           = optional(map(string), {})
    data = object({
      claim_name = string
      path       = optional(string, "/")
      format     = optional(string, "Manifest")
    })
    privacy_budget = object({
      epsilon = number
      delta   = optional(number, 0.00001)
    })
    consented_studies         = optional(list(string), [])
    allowed_trainer_images    = optional(list(string), [])
    allow_non_private_studies = optional(bool, false)
    trainer = optional(object({
      node_selector = optional(map(string))
      resources = optional(object({
        requests = optional(map(string))
        limits   = optional(map(string))
      }))
      tolerations = optional(list(object({
        key                = optional(string)
        operator           = optional(string)
        value              = optional(string)
        effect             = optional(string)
        toleration_seconds = optional(number)
      })))
    }))
  }))
  default  = {}
  nullable = false

  validation {
    # The name is also part of the Helm release "hc-<name>" (at most 53 characters).
    condition     = alltrue([for name, h in var.hospitals : length(name) <= 50 && can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", name))])
    error_message = "Every hospital name (map key) must be a DNS label (lower-case alphanumerics and '-', starting and ending alphanumeric) of at most 50 characters."
  }
  validation {
    condition = alltrue([
      for name, h in var.hospitals : h.namespace == null || try(length(h.namespace) <= 63 && can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", h.namespace)), false)
    ])
    error_message = "Every hospital namespace must be a DNS label (lower-case alphanumerics and '-', starting and ending alphanumeric, at most 63 characters)."
  }
  validation {
    condition     = length(distinct([for name, h in var.hospitals : coalesce(h.namespace, "hospital-${name}")])) == length(var.hospitals)
    error_message = "Each hospital needs its own namespace: two hospitals have the same namespace."
  }
  validation {
    condition     = alltrue([for name, h in var.hospitals : h.privacy_budget.epsilon > 0 && h.privacy_budget.epsilon <= 1000])
    error_message = "Every hospital's privacy_budget.epsilon must be in (0, 1000]."
  }
  validation {
    condition     = alltrue([for name, h in var.hospitals : h.privacy_budget.delta != null && try(h.privacy_budget.delta > 0 && h.privacy_budget.delta < 1, false)])
    error_message = "Every hospital's privacy_budget.delta must be in (0, 1)."
  }
  validation {
    condition = alltrue([
      for name, h in var.hospitals : length(h.data.claim_name) <= 253 && can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", h.data.claim_name))
    ])
    error_message = "Every hospital's data.claim_name must name a PersistentVolumeClaim: lower-case alphanumerics and '-', starting and ending alphanumeric."
  }
  validation {
    condition = alltrue([
      for name, h in var.hospitals : h.data.path != null && try(length(h.data.path) >= 1 && length(h.data.path) <= 1024 && !strcontains(h.data.path, ".."), false)
    ])
    error_message = "Every hospital's data.path must be 1 to 1024 characters and must not contain '..'."
  }
  validation {
    condition     = alltrue([for name, h in var.hospitals : contains(["Manifest", "UtkfaceFilenames"], coalesce(h.data.format, "-"))])
    error_message = "Every hospital's data.format must be \"Manifest\" or \"UtkfaceFilenames\"."
  }
  validation {
    condition = alltrue(flatten([
      for name, h in var.hospitals : [
        for s in h.consented_studies : length(s) <= 200 && can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?(@[0-9a-f]{64})?$", s))
      ]
    ]))
    error_message = "Every consented study must be \"<namespace>/<name>\" or \"<namespace>/<name>@<64 hex consent hash>\" of a FederatedStudy (two DNS labels, at most 200 characters)."
  }
  validation {
    condition     = alltrue([for name, h in var.hospitals : length(h.consented_studies) <= 256 && length(distinct(h.consented_studies)) == length(h.consented_studies)])
    error_message = "A hospital's consented_studies must not repeat a study and may hold at most 256 studies."
  }
  validation {
    condition = alltrue(flatten([
      for name, h in var.hospitals : concat([length(h.allowed_trainer_images) <= 64], [
        for i in h.allowed_trainer_images : length(i) >= 1 && length(i) <= 512 && (
          endswith(i, "/") || can(regex("^sha256:[0-9a-f]{64}$", i)) || can(regex("^[^@]+@sha256:[0-9a-f]{64}$", i))
        )
      ])
    ]))
    error_message = "Every allowed_trainer_images entry must be a digest (sha256:<64 hex>), an image pinned by digest (repo@sha256:<64 hex>) or a registry/repository prefix ending in \"/\" (at most 64 entries of at most 512 characters)."
  }
  validation {
    condition = alltrue(flatten([
      for name, h in var.hospitals : [
        for t in try(coalesce(h.trainer.tolerations, []), []) : [
          t.operator == null || contains(["Exists", "Equal", "Lt", "Gt"], coalesce(t.operator, "-")),
          t.effect == null || contains(["NoSchedule", "PreferNoSchedule", "NoExecute"], coalesce(t.effect, "-")),
        ]
      ]
    ]))
    error_message = "Trainer tolerations: operator must be Exists, Equal, Lt or Gt, and effect NoSchedule, PreferNoSchedule or NoExecute."
  }
}

variable "extra_values" {
  description = "More Helm values documents (YAML strings), applied after the ones built from the variables above."
  type        = list(string)
  default     = []
  nullable    = false
}
