-- Argo CD health of a FederatedStudy (fl.caduceus.dev/v1alpha1).
--
-- Reads the conditions the Caduceus operator writes (operator/src/study.rs):
--   Ready            True:  Running, Completed
--                    False: Suspended, WaitingForHospitals, Invalid, ModelStoreMissing,
--                           PrivacyBudgetExhausted, RoundFailed
--   FairnessDegraded True:  ThresholdsExceeded (the last rounds violated the fairness thresholds)
--
-- Only the Lua base and table libraries are used: Argo CD runs argocd-cm scripts without the
-- string, math, io and os libraries (resource.customizations.useOpenLibs is not needed).
local hs = {}

local function condition(status, conditionType)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == conditionType then
      return c
    end
  end
  return nil
end

-- "Reason: message" of a condition.
local function describe(c)
  local text = c.reason or c.type
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

-- A message when the status (or the condition) describes an older generation than the spec.
local function staleness(generation, status, c)
  if generation == nil then
    return nil
  end
  local observed = status.observedGeneration
  if observed == nil then
    return "Waiting for the operator to observe generation " .. generation .. " (the status has no observedGeneration)"
  end
  if observed < generation then
    return "Waiting for the operator to observe generation " .. generation .. " (the status describes generation " .. observed .. ")"
  end
  if c ~= nil and c.observedGeneration ~= nil and c.observedGeneration < generation then
    return "Waiting for the operator to observe generation " .. generation .. " (the " .. c.type .. " condition describes generation " .. c.observedGeneration .. ")"
  end
  return nil
end

local function progress(obj)
  local done = obj.status.completedRounds or 0
  local total = nil
  if obj.spec ~= nil and obj.spec.rounds ~= nil then
    total = obj.spec.rounds.total
  end
  if total == nil then
    return done .. " rounds succeeded"
  end
  return done .. " of " .. total .. " rounds succeeded"
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report the study's status"
  return hs
end

local ready = condition(status, "Ready")
local stale = staleness(obj.metadata.generation, status, ready)
if stale ~= nil then
  hs.status = "Progressing"
  hs.message = stale
  return hs
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to set the Ready condition"
  return hs
end

local fairness = condition(status, "FairnessDegraded")

if ready.status == "True" then
  if fairness ~= nil and fairness.status == "True" then
    hs.status = "Degraded"
    hs.message = "FairnessDegraded: " .. describe(fairness)
    return hs
  end
  if ready.reason == "Running" then
    hs.status = "Progressing"
    hs.message = describe(ready) .. " (" .. progress(obj) .. ")"
    return hs
  end
  hs.status = "Healthy"
  hs.message = describe(ready)
  if status.accuracy ~= nil then
    hs.message = hs.message .. "; accuracy " .. status.accuracy
  end
  if status.equalizedOddsDifference ~= nil then
    hs.message = hs.message .. ", equalized odds difference " .. status.equalizedOddsDifference
  end
  return hs
end

if ready.status == "False" then
  if ready.reason == "Suspended" then
    hs.status = "Suspended"
    hs.message = describe(ready) .. " (" .. progress(obj) .. ")"
    return hs
  end
  if ready.reason == "WaitingForHospitals" then
    hs.status = "Progressing"
    hs.message = describe(ready)
    return hs
  end
  -- Invalid, ModelStoreMissing, PrivacyBudgetExhausted, RoundFailed: the study cannot go on
  -- until someone changes its spec, the hospitals' budgets or the cluster.
  hs.status = "Degraded"
  hs.message = describe(ready)
  return hs
end

if ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = describe(ready)
  return hs
end

hs.status = "Unknown"
hs.message = "Ready condition has an unexpected status " .. tostring(ready.status) .. ": " .. describe(ready)
return hs
