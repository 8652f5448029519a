{{/* The release's base name, at most 63 characters. */}}
{{- define "caduceus.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "caduceus.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "caduceus.labels" -}}
{{ include "caduceus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: caduceus
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "caduceus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "caduceus.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag, the tag defaulting to the chart's appVersion. Argument: dict "image" . "root" $ */}}
{{- define "caduceus.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* Leader election is on when asked for, and always with more than one replica. */}}
{{- define "caduceus.leaderElect" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) -}}true{{- else -}}false{{- end -}}
{{- end -}}

{{/* The hospital's namespace of role site: the <namespace> of site.hospital (<namespace>/<name>). */}}
{{- define "caduceus.siteNamespace" -}}
{{- index (splitList "/" .Values.site.hospital) 0 -}}
{{- end -}}

{{/*
The namespaces the operator runs Jobs in, as a JSON list: the study namespaces (aggregators) and the
hospital namespaces (trainers). Role coordinator: the study namespaces only (its hospitals are sites);
role site: the hospital's own namespace only. Use: fromJsonArray (include "caduceus.studyNamespaces" .)
*/}}
{{- define "caduceus.studyNamespaces" -}}
{{- if eq .Values.role "site" }}[]{{ else }}{{ toJson .Values.namespaces.studies }}{{ end -}}
{{- end -}}
{{- define "caduceus.hospitalNamespaces" -}}
{{- if eq .Values.role "site" }}{{ list (include "caduceus.siteNamespace" .) | toJson }}
{{- else if eq .Values.role "coordinator" }}[]
{{- else }}{{ toJson .Values.namespaces.hospitals }}{{ end -}}
{{- end -}}
{{/* Study namespaces first, each once (JSON list): default deny, admission policy bindings. */}}
{{- define "caduceus.workloadNamespaces" -}}
{{- uniq (concat (fromJsonArray (include "caduceus.studyNamespaces" .)) (fromJsonArray (include "caduceus.hospitalNamespaces" .))) | toJson -}}
{{- end -}}

{{/* The namespaces the operator serves (CADUCEUS_WATCH_NAMESPACES), comma-separated: the workload
namespaces, and with role coordinator the sites namespace of the hospitals' mirrors. */}}
{{- define "caduceus.servedNamespaces" -}}
{{- $served := fromJsonArray (include "caduceus.workloadNamespaces" .) }}
{{- if eq .Values.role "coordinator" }}{{ $served = uniq (append $served .Values.namespaces.sites) }}{{ end }}
{{- join "," $served -}}
{{- end -}}

{{/* The operator's user name as the API server sees it. */}}
{{- define "caduceus.operatorUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "caduceus.serviceAccountName" .) -}}
{{- end -}}

{{/* Values that the schema cannot check on its own; included by the Deployment, which always renders. */}}
{{- define "caduceus.validate" -}}
{{- if eq .Values.role "site" }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$" .Values.site.hospital) }}
{{- fail "site.hospital is required with role site: the site's own HospitalClient as <namespace>/<name> (e.g. --set site.hospital=hospital-st-mary/st-mary); the operator gets a Role in that namespace only" }}
{{- end }}
{{- if or (not (empty .Values.namespaces.studies)) (not (empty .Values.namespaces.hospitals)) }}
{{- fail "namespaces.studies and namespaces.hospitals must be empty with role site: a site serves only the namespace of site.hospital, and its studies live in the coordinator's cluster" }}
{{- end }}
{{- if .Values.metrics.serviceMonitor.enabled }}
{{- fail "metrics.serviceMonitor.enabled cannot be used with role site: a site renders no Service (no inbound port but the pod's metrics/health port); scrape the pod with a PodMonitor instead" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (empty .Values.networkPolicy.coordinator.cidrs) }}
{{- fail "networkPolicy.coordinator.cidrs is empty: with role site and networkPolicy.enabled the site agent dials the coordinator's gateway and the trainers its aggregators; list the coordinator's addresses as CIDRs (e.g. --set 'networkPolicy.coordinator.cidrs={203.0.113.10/32}'), or set networkPolicy.enabled=false" }}
{{- end }}
{{- else }}
{{- if eq .Values.role "coordinator" }}
{{- if not .Values.gateway.address }}
{{- fail "gateway.address is required with role coordinator: the host:port the sites dial (the gateway Service's external address), written into every join bundle (e.g. --set gateway.address=fl.example.org:7443)" }}
{{- end }}
{{- if not (empty .Values.namespaces.hospitals) }}
{{- fail "namespaces.hospitals must be empty with role coordinator: its hospitals are sites (their mirrors live in namespaces.sites) and it runs no trainers; use role all for hospitals in this cluster" }}
{{- end }}
{{- if has .Values.namespaces.sites .Values.namespaces.studies }}
{{- fail "namespaces.sites must not be one of namespaces.studies: the sites namespace holds only the hospitals' mirrors" }}
{{- end }}
{{- end }}
{{- if empty .Values.namespaces.studies }}
{{- fail "namespaces.studies is empty: list the namespaces of your FederatedStudies (e.g. --set 'namespaces.studies={caduceus-studies}'); the operator gets Roles and watches Jobs, Secrets and Pods only in the namespaces listed, and they must exist before the install" }}
{{- end }}
{{- if and (eq .Values.role "all") (empty .Values.namespaces.hospitals) }}
{{- fail "namespaces.hospitals is empty: list the namespaces of your HospitalClients (e.g. --set 'namespaces.hospitals={hospital-st-mary,hospital-riverside}'); the operator gets Roles and watches Jobs, Secrets and Pods only in the namespaces listed, and they must exist before the install" }}
{{- end }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (ne (toString .Values.tracing.otlpEndpoint) "") (empty .Values.networkPolicy.tracing.to) }}
{{- fail "networkPolicy.tracing.to is empty: with tracing.otlpEndpoint and networkPolicy.enabled the operator, aggregators and trainers export spans to the collector, which the chart's policies otherwise block; list it as NetworkPolicy peers, e.g. --set-json 'networkPolicy.tracing.to=[{\"namespaceSelector\":{\"matchLabels\":{\"kubernetes.io/metadata.name\":\"observability\"}}}]', or set networkPolicy.enabled=false" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (empty .Values.networkPolicy.apiServer.cidrs) }}
{{- fail "networkPolicy.apiServer.cidrs is empty: with networkPolicy.enabled the operator may reach only the API server's endpoints; list their addresses as CIDRs (kubectl get endpointslices -n default -l kubernetes.io/service-name=kubernetes), e.g. --set 'networkPolicy.apiServer.cidrs={10.0.0.10/32}', or set networkPolicy.enabled=false" }}
{{- end }}
{{- /* Only with the cluster's discovery (it lists kinds; `helm template`'s built-in set lists only group/versions). */}}
{{- $discovered := .Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/ValidatingWebhookConfiguration" }}
{{- if and .Values.admissionPolicy.enabled $discovered (not (.Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy")) }}
{{- fail (printf "admissionPolicy.enabled needs ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1, Kubernetes >= 1.30), which this cluster (%s) does not serve: upgrade it or set admissionPolicy.enabled=false" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- end -}}

{{/* CEL: the metadata at the given path carries app.kubernetes.io/managed-by=caduceus-operator. */}}
{{- define "caduceus.celManaged" -}}
(has({{ . }}.labels) && 'app.kubernetes.io/managed-by' in {{ . }}.labels && {{ . }}.labels['app.kubernetes.io/managed-by'] == 'caduceus-operator')
{{- end -}}
