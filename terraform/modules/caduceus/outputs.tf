output "release_name" {
  description = "Name of the operator's Helm release."
  value       = helm_release.caduceus.name
}

output "release_namespace" {
  description = "Namespace of the operator's Helm release."
  value       = helm_release.caduceus.namespace
}

output "release_status" {
  description = "Status of the operator's Helm release (deployed, failed, ...)."
  value       = helm_release.caduceus.status
}

output "hospital_namespaces" {
  description = "Namespace of each hospital, by hospital name."
  value       = { for name, h in local.hospitals : name => h.namespace }
}

output "hospital_clients" {
  description = "Each HospitalClient as \"<namespace>/<name>\", by hospital name."
  value       = { for name, r in helm_release.hospital : name => "${r.namespace}/${name}" }
}

output "study_namespaces" {
  description = "Namespaces of the studies (created by the module when create_study_namespaces is true)."
  value       = var.study_namespaces
}

output "values" {
  description = "The Helm values the module passes to the chart (before extra_values), as YAML."
  value       = yamlencode(local.values)
}

output "role" {
  description = "The chart's role: all, coordinator or site."
  value       = var.role
}

output "sites_namespace" {
  description = "Role coordinator: namespace of the hospitals' mirror HospitalClients (null for the other roles)."
  value       = var.role == "coordinator" ? var.sites_namespace : null
}

output "site_hospital" {
  description = "Role site: the site's own HospitalClient, \"<namespace>/<name>\" (null for the other roles)."
  value       = var.role == "site" ? lookup(local.site, "hospital", null) : null
}
